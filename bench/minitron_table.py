"""Benchmark: the Minitron paper's comparisons on the embedded SmolLM2-135M, every student the same size.

python bench/minitron_table.py --small                      # the 2-CPU-core preset (docs/results.md)
python bench/minitron_table.py --small --rows width_kd,depth_kd --tokens 2048 --no-docs   # a quick check
python bench/minitron_table.py --list                       # the row ids

Rows (data: ROWS / STUDENTS / TRAININGS below): the teacher; width (hidden 576->468, ffn 1536->750) with no
retraining / LM-loss retraining / logit KD / logit+intermediate KD / synthetic-data fine-tuning, T tokens
each; depth (30->15 layers) with no retraining / logit KD / logit+intermediate KD; iterative (two
prune->distill rounds of T/2 through launch/compress.py) vs one-shot; head folding on vs off (6 heads, ffn
642); the width shape from random init trained with LM loss on T and 10T tokens; contrastive
intermediate loss; 50% unstructured (magnitude, Wanda) and 2:4 (Wanda) sparsity without retraining and
with logit KD T. Every stage runs the real launchers (launch/prune.py, distill.py,
generate.py, compress.py) as subprocesses with configs/smollm2_cpu.yaml plus overrides; importance is
computed once and reused. Every model is then scored on the same held-out rows (the pinned protocol of
launch/evaluate.py, one row at a time through megaslim.eval.evaluate_rows) so each row has per-row losses:
the table gives the loss, PPL, a standard error over rows and a paired SE of the difference to the
reference row. Verdicts on the paper's claims are generated from those numbers (2-SE rule).

Outputs: run directories under --out-dir (default /tmp/megaslim_table; finished stages are reused on a
rerun), docs/results.md, docs/results.json, docs/results_loss_curves.png.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "smollm2_cpu.yaml"

# --small preset (2 CPU cores). SMALL_TOKENS is T, from measurements on the 2-core dev machine (seq 128,
# micro-batch 8 = 1024 tokens/step): logit KD of the width student ~155 tokens/s when the machine is quiet
# (~6.5 s/step; 60-70 tokens/s while other jobs share the cores), LM-only steps ~1.6x cheaper (no teacher
# forward), ~40 s of fixed cost per distill run, ~30 s per prune. At T = 8192 (8 steps; 10T = 80 steps)
# all 23 rows add up to ~40 minutes on a quiet machine (estimate in the PR note).
SMALL_SEQ, SMALL_EVAL_ROWS, SMALL_TOKENS = 128, 32, 8192

# --------------------------------------------------------------------------------------------------
# what to run: shapes, students, trainings, rows, claims (plain data)
# --------------------------------------------------------------------------------------------------
WIDTH = {"hidden_size": 468, "ffn_hidden_size": 750}  # Llama-3.1-Minitron-4B-Width analogue
WIDTH_MID = {"hidden_size": 522, "ffn_hidden_size": 1143}  # halfway on each axis; 522 = 9 x 58 (HF export)
HEADS = {"num_attention_heads": 6, "ffn_hidden_size": 642}  # 3 groups x 2 heads, hidden kept
DEPTH_LAYERS = 15  # 30 -> 15 layers: same non-embedding params as WIDTH (53.10M vs 53.18M, docs/pruning.md)
UNSET_SHAPE = ("prune.export_config.hidden_size=null", "prune.export_config.ffn_hidden_size=null")


def _shape(shape: dict) -> tuple[str, ...]:
    """Overrides that set prune.export_config to exactly `shape` (the config's own target unset first)."""
    return UNSET_SHAPE + tuple(f"prune.export_config.{k}={v}" for k, v in shape.items())


@dataclass(frozen=True)
class Student:
    """How a student is built. kind: teacher (the source model) | prune (launch/prune.py with the shared
    importance scores and `overrides`) | scratch (random init of the `like` student's shape)."""
    kind: str
    overrides: tuple[str, ...] = ()
    like: Optional[str] = None
    sparsity: Optional[float] = None  # expected fraction of zero decoder weights, checked after pruning


STUDENTS: dict[str, Student] = {
    "teacher": Student("teacher"),
    "width": Student("prune", _shape(WIDTH)),
    "depth": Student("prune", _shape({"num_layers": "{depth_layers}"})),
    "heads": Student("prune", _shape(HEADS)),
    "heads_fold": Student("prune", _shape(HEADS) + ("prune.fold_heads=true",)),
    "scratch": Student("scratch", like="width"),
    "mag50": Student("prune", UNSET_SHAPE + ("prune.sparsity.method=magnitude", "prune.sparsity.ratio=0.5"),
                     sparsity=0.5),
    "wanda50": Student("prune", UNSET_SHAPE + ("prune.sparsity.method=wanda", "prune.sparsity.ratio=0.5"),
                       sparsity=0.5),
    "wanda24": Student("prune", UNSET_SHAPE + ("prune.sparsity.method=wanda", "prune.sparsity.pattern=2:4"),
                       sparsity=0.5),
}

LM = ("distill.kd_loss_scale=0", "distill.skip_lm_loss=false")
# How a student is trained. "{pairs}" is filled from the student's prune plan (intermediate_pairs).
TRAININGS: dict[str, tuple[str, ...]] = {
    "none": (),
    "kd": (),
    "lm": LM,
    "kd_inter": ("distill.intermediate_layer_pairs={pairs}", "distill.intermediate_loss=cosine"),
    "kd_contrastive": ("distill.intermediate_layer_pairs={pairs}", "distill.intermediate_loss=contrastive"),
    "synthetic": LM,  # after launch/generate.py: data.train_path=<synthetic.jsonl>
    "iterative": (),  # launch/compress.py: rounds WIDTH_MID -> WIDTH, T/2 of logit KD each
}


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    student: str  # key of STUDENTS
    train: str  # key of TRAININGS
    tokens: float = 1.0  # multiple of T (0 for no retraining)


ROWS: list[Row] = [
    Row("teacher", "teacher (SmolLM2-135M)", "teacher", "none", 0),
    Row("width_none", "width: no retraining", "width", "none", 0),
    Row("width_lm", "width: LM-loss retraining T", "width", "lm"),
    Row("width_kd", "width: logit KD T", "width", "kd"),
    Row("width_inter", "width: logit+intermediate KD T", "width", "kd_inter"),
    Row("width_synth", "width: synthetic-data fine-tuning T", "width", "synthetic"),
    Row("depth_none", "depth: no retraining", "depth", "none", 0),
    Row("depth_kd", "depth: logit KD T", "depth", "kd"),
    Row("depth_inter", "depth: logit+intermediate KD T", "depth", "kd_inter"),
    Row("width_iter", "width: iterative, 2 rounds x T/2 logit KD", "width", "iterative"),
    Row("heads_none", "heads: no folding, no retraining", "heads", "none", 0),
    Row("heads_fold_none", "heads: folding, no retraining", "heads_fold", "none", 0),
    Row("heads_kd", "heads: no folding, logit KD T", "heads", "kd"),
    Row("heads_fold_kd", "heads: folding, logit KD T", "heads_fold", "kd"),
    Row("scratch_T", "width shape, random init, LM T", "scratch", "lm"),
    Row("scratch_10T", "width shape, random init, LM 10T", "scratch", "lm", 10.0),
    Row("depth_contrastive", "depth: logit+contrastive KD T", "depth", "kd_contrastive"),
    Row("mag50_none", "50% unstructured magnitude: no retraining", "mag50", "none", 0),
    Row("mag50_kd", "50% unstructured magnitude: logit KD T", "mag50", "kd"),
    Row("wanda50_none", "50% unstructured Wanda: no retraining", "wanda50", "none", 0),
    Row("wanda50_kd", "50% unstructured Wanda: logit KD T", "wanda50", "kd"),
    Row("wanda24_none", "2:4 Wanda: no retraining", "wanda24", "none", 0),
    Row("wanda24_kd", "2:4 Wanda: logit KD T", "wanda24", "kd"),
]
REFERENCE = "width_kd"  # the paired-difference column is against this row


@dataclass(frozen=True)
class Claim:
    """A paper claim checked on rows a and b. expect "a<b": a has the lower loss; "no_gain": a is not
    lower than b (the paper saw no benefit from a)."""
    topic: str
    paper: str
    a: str
    b: str
    expect: str


CLAIMS: list[Claim] = [
    Claim("width vs depth", "width-pruned students beat depth-pruned ones of the same size after distillation",
          "width_kd", "depth_kd", "a<b"),
    Claim("KD vs LM-loss retraining", "retraining with logit distillation beats retraining with the LM loss "
          "at equal tokens", "width_kd", "width_lm", "a<b"),
    Claim("logit-only vs logit+intermediate (depth)", "when depth is cut a lot, adding intermediate-state "
          "distillation to the logit loss helps", "depth_inter", "depth_kd", "a<b"),
    Claim("logit-only vs logit+intermediate (width)", "when depth is kept, logit-only distillation is enough "
          "(intermediate states add nothing)", "width_inter", "width_kd", "no_gain"),
    Claim("one-shot vs iterative", "iterating prune -> distill gives no gain over one-shot pruning at equal "
          "tokens", "width_iter", "width_kd", "no_gain"),
    Claim("pruned+KD vs scratch at 10x tokens", "a pruned and distilled student beats the same architecture "
          "trained from scratch on many more tokens", "width_kd", "scratch_10T", "a<b"),
]
# Measured effects without a paper claim to test: (label, a, b).
EFFECTS: list[tuple[str, str, str]] = [
    ("head folding, no retraining (folding - no folding)", "heads_fold_none", "heads_none"),
    ("head folding after logit KD T (folding - no folding)", "heads_fold_kd", "heads_kd"),
    ("synthetic-data fine-tuning - LM retraining on real data", "width_synth", "width_lm"),
    ("width: no retraining - depth: no retraining", "width_none", "depth_none"),
    ("contrastive - cosine intermediate loss (depth)", "depth_contrastive", "depth_inter"),
    ("50% magnitude + KD - width KD", "mag50_kd", "width_kd"),
    ("50% Wanda + KD - width KD", "wanda50_kd", "width_kd"),
    ("2:4 Wanda + KD - width KD", "wanda24_kd", "width_kd"),
]


def select_rows(spec: Optional[str], rows: list[Row] = ROWS) -> list[Row]:
    """Rows whose id matches one of the comma-separated ids / glob patterns (all when spec is empty)."""
    if not spec:
        return list(rows)
    pats = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in pats if not any(fnmatch.fnmatchcase(r.id, p) for r in rows)]
    if unknown:
        raise SystemExit(f"--rows: no row matches {unknown}; ids: {', '.join(r.id for r in rows)}")
    return [r for r in rows if any(fnmatch.fnmatchcase(r.id, p) for p in pats)]


def settings_tag(args) -> str:
    """Run-directory name for the settings every stage depends on."""
    import hashlib

    tag = f"seq{args.seq_length}_T{args.tokens}_eval{args.eval_rows}_depth{args.depth_layers}"
    extra = [str(Path(args.config).resolve())] if Path(args.config).resolve() != DEFAULT_CONFIG else []
    extra += [args.eval_path] if args.eval_path else []
    if extra:
        tag += "_" + hashlib.sha1("\n".join(extra).encode()).hexdigest()[:8]
    return tag


def steps_for(tokens: float, tokens_per_step: int) -> int:
    return max(1, round(tokens / tokens_per_step))


def intermediate_pairs(keep_layers: list[int]) -> list[list[int]]:
    """Student middle and last layer, each paired with the teacher layer it was copied from."""
    n = len(keep_layers)
    return [[i, keep_layers[i]] for i in sorted({n // 2 - 1, n - 1}) if i >= 0]


# --------------------------------------------------------------------------------------------------
# statistics and verdicts (pure)
# --------------------------------------------------------------------------------------------------
def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def std_err(xs: list[float]) -> float:
    """Standard error of the mean: sample standard deviation (n - 1) / sqrt(n)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def paired(a: list[float], b: list[float]) -> dict:
    """mean(a) - mean(b) and the SE of the per-row differences (rows are the same eval rows)."""
    if len(a) != len(b):
        raise ValueError(f"paired rows differ in length ({len(a)} vs {len(b)})")
    d = [x - y for x, y in zip(a, b)]
    diff, se = mean(d), std_err(d)
    return {"diff": diff, "se": se, "significant": bool(abs(diff) > 2 * se)}


def compare_text(name_a: str, name_b: str, p: dict) -> str:
    if not p["significant"]:
        return (f"{name_a} and {name_b} do not differ beyond 2 SE (difference {p['diff']:+.4f}, "
                f"2 SE = {2 * p['se']:.4f})")
    lower, higher = (name_a, name_b) if p["diff"] < 0 else (name_b, name_a)
    return (f"{lower} has the lower loss, by {abs(p['diff']):.4f} > 2 SE = {2 * p['se']:.4f}; "
            f"{higher} is worse")


def verdict(claim: Claim, results: dict[str, dict]) -> dict:
    """{"outcome": held | did not hold | not shown | not measured, "text": ...} for `claim` from the
    per-row losses in results[id]["row_losses"] (absent or no losses: not measured)."""
    ra, rb = results.get(claim.a), results.get(claim.b)
    missing = [(rid, r) for rid, r in ((claim.a, ra), (claim.b, rb)) if not r or not r.get("row_losses")]
    if missing:
        why = "; ".join(f"{rid}: {(r or {}).get('status', 'not run')}" for rid, r in missing)
        return {"outcome": "not measured", "text": f"Not measured ({why})."}
    p = paired(ra["row_losses"], rb["row_losses"])
    la, lb = ra.get("label", claim.a), rb.get("label", claim.b)
    measured = compare_text(la, lb, p)
    if claim.expect == "a<b":
        outcome = "held" if p["significant"] and p["diff"] < 0 else (
            "did not hold" if p["significant"] else "not shown")
    elif claim.expect == "no_gain":
        outcome = "did not hold" if p["significant"] and p["diff"] < 0 else "held"
    else:
        raise ValueError(f"unknown expectation {claim.expect!r}")
    word = {"held": "Held", "did not hold": "Did not hold",
            "not shown": "Not shown at this scale (within 2 SE)"}[outcome]
    return {"outcome": outcome, "diff": p["diff"], "se": p["se"], "text": f"{word}: {measured}."}


# --------------------------------------------------------------------------------------------------
# markdown (pure)
# --------------------------------------------------------------------------------------------------
def _f(x, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def row_table(results: dict[str, dict], order: list[str], reference: str) -> list[str]:
    ref = results.get(reference, {}).get("row_losses")
    lines = ["| row | params (non-emb.) | held-out loss | PPL | SE | Δ vs ref ± paired SE | tokens | wall s "
             "| notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rid in order:
        r = results[rid]
        params = (f"{r['params'] / 1e6:.2f}M ({r['params_non_embedding'] / 1e6:.2f}M)"
                  if r.get("params") else "-")
        if r.get("row_losses"):
            loss, se = r["loss"], std_err(r["row_losses"])
            if rid == reference:
                delta = "ref"
            elif ref:
                p = paired(r["row_losses"], ref)
                delta = f"{p['diff']:+.4f} ± {p['se']:.4f}" + (" *" if p["significant"] else "")
            else:
                delta = "-"
            cells = [f"{loss:.4f}", f"{math.exp(loss):.1f}", f"{se:.4f}", delta]
        else:
            cells = ["-", "-", "-", "-"]
        wall = sum(v for v in (r.get("prune_seconds"), r.get("train_seconds")) if v)
        notes = r.get("status", "")
        notes = "" if notes == "ok" else notes
        if r.get("notes"):
            notes = "; ".join(x for x in (notes, r["notes"]) if x)
        lines.append(f"| {r.get('label', rid)} (`{rid}`) | {params} | " + " | ".join(cells)
                     + f" | {r.get('tokens', 0):,} | {_f(wall or None, '.0f')} | {notes.replace('|', '/')} |")
    return lines


def render_markdown(doc: dict) -> str:
    """docs/results.md from the results dict (meta, rows, claims, effects)."""
    m, results = doc["meta"], doc["rows"]
    order = [rid for rid in doc["order"] if rid in results]
    out = ["# Minitron comparisons on SmolLM2-135M (`bench/minitron_table.py`)", "",
           f"Command: `{m['command']}`  ",
           f"Machine: {m['machine']}; {m['date']}; total wall time {m['wall_seconds'] / 60:.1f} min.  ",
           f"Settings: T = {m['tokens']:,} training tokens ({m['steps_T']} steps of {m['tokens_per_step']:,} "
           f"tokens: micro-batch {m['micro_batch_size']} x global batch {m['global_batch_size']} x seq "
           f"{m['seq_length']}), LR {m['lr']:g} -> {m['min_lr']:g} cosine, config `{m['config']}`. Held-out: "
           f"{m['eval_rows']} rows x {m['seq_length']} tokens of {m['eval_path']} (launch/evaluate.py's "
           "protocol).", "",
           f"Shapes: width = hidden 576->468, ffn 1536->750 (heads kept); depth = 30->{m['depth_layers']} layers "
           f"(lowest Block Importance dropped); heads = 9->6 heads (3 groups x 2), ffn 1536->642; iterative = "
           "width in two rounds through hidden 522 / ffn 1143. Width, depth and heads students have the same "
           "**non-embedding** parameter count (53.1-53.2M); their totals differ because the tied 49152-row "
           "embedding scales with the hidden size (both counts are in the table).", "",
           "SE = standard error of the loss over eval rows (per-row mean losses). Δ vs ref = loss minus the "
           f"reference row `{doc['reference']}` on the same rows, ± the SE of the per-row differences; `*` "
           "marks |Δ| > 2 paired SE. Rows are paired (every model sees the same rows, so row difficulty "
           "cancels): the paired SE is the right test, and it is usually much smaller than either row's SE. "
           "Eval rows are consecutive windows of the same documents, so they are not fully independent: "
           "read 2 SE as a rough bar, not an exact test.", ""]
    out += row_table(results, order, doc["reference"])
    out += ["", "## The paper's claims at this scale", "",
            "Generated from the numbers above: a difference counts only beyond 2 paired SE.", ""]
    for c in doc["claims"]:
        out.append(f"- **{c['topic']}** (paper: {c['paper']}). {c['text']}")
    effects = [e for e in doc.get("effects", []) if e.get("text")]
    if effects:
        out += ["", "## Other measured effects", ""]
        out += [f"- {e['label']}: {e['text']}" for e in effects]
    out += ["", "## Loss curves", "",
            "![loss curves](results_loss_curves.png)", "",
            "Training loss (left) and held-out loss (right) of the distillation runs against training tokens "
            "(from each run's metrics.jsonl).", ""]
    if doc.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# running the launchers
# --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ERR = re.compile(r"^(?:\[rank \d+\] )?error: (.*)$")


def failure_message(stderr: str) -> tuple[str, str]:
    """("refused", msg) for a launcher's one-line user error, else ("failed", last traceback line)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = _ERR.match(ln)
        if m:
            return "refused", m.group(1)
    tb = [ln for ln in lines if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", ln)]
    return "failed", (tb[-1] if tb else (lines[-1] if lines else "no output"))[:300]


class StageError(Exception):
    def __init__(self, kind: str, msg: str):
        super().__init__(f"{kind}: {msg}")
        self.kind, self.msg = kind, msg


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out_dir) / settings_tag(args)  # runs with other settings never mix
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore",
                        TORCH_CPP_LOG_LEVEL="ERROR")
        self.cache: dict[str, object] = {}

    # -- plumbing -------------------------------------------------------------------------------------
    def common(self) -> list[str]:
        a = self.args
        o = [f"data.seq_length={a.seq_length}", f"eval.num_samples={a.eval_rows}", "export.hf_dir=null"]
        if a.eval_path:
            o.append(f"data.eval_path={a.eval_path}")
        return o

    def launch(self, script: str, overrides: list[str], out_dir: Path, done: str, what: str) -> tuple[dict, float]:
        """Run launch/<script> (torchrun, 1 process) into out_dir unless out_dir/done exists; returns that
        JSON and the wall seconds (recorded beside it, so a rerun reports the original time)."""
        done_path, stamp = out_dir / done, out_dir / "bench_stage.json"
        if done_path.is_file() and stamp.is_file():
            st = json.loads(stamp.read_text())
            if st.get("overrides", overrides) != overrides:
                raise StageError("failed", f"{out_dir} holds a run with other overrides ({st['overrides']}); "
                                 "remove it or choose another --out-dir")
            return json.loads(done_path.read_text()), st["seconds"]
        fail = out_dir / "bench_failed.json"
        if fail.is_file() and not self.args.retry_failed:
            f = json.loads(fail.read_text())
            raise StageError(f["kind"], f["msg"])
        out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", f"--master-port={_free_port()}",
               str(ROOT / "launch" / script), "--config", str(self.args.config), *overrides,
               f"output_dir={out_dir}"]
        print(f"[bench] {what}: {' '.join(shlex.quote(c) for c in cmd[2:])}", flush=True)
        t0 = time.time()
        with open(out_dir / "bench_stdout.log", "w") as so, open(out_dir / "bench_stderr.log", "w") as se:
            rc = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=so, stderr=se).returncode
        seconds = time.time() - t0
        if rc != 0 or not done_path.is_file():
            kind, msg = failure_message((out_dir / "bench_stderr.log").read_text())
            json.dump({"kind": kind, "msg": msg, "rc": rc}, open(fail, "w"))
            print(f"[bench] {what}: {kind}: {msg}", flush=True)
            raise StageError(kind, msg)
        fail.unlink(missing_ok=True)
        stamp.write_text(json.dumps({"seconds": seconds, "overrides": overrides, "command": cmd}))
        print(f"[bench] {what}: done in {seconds:.0f} s", flush=True)
        return json.loads(done_path.read_text()), seconds

    def worker(self, mode: str, spec: dict, out: Path, what: str) -> dict:
        """This script's in-process worker (evaluation or random init) as a subprocess."""
        if out.is_file():
            return json.loads(out.read_text())
        spec_path = out.with_suffix(".spec.json")
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec))
        print(f"[bench] {what}", flush=True)
        log = out.with_suffix(".log")
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", mode, str(spec_path)],
                                cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0 or not out.is_file():
            kind, msg = failure_message(log.read_text())
            raise StageError("failed", f"{mode} worker: {msg}")
        return json.loads(out.read_text())

    # -- shared stages -----------------------------------------------------------------------------------
    def importance(self) -> Path:
        d = self.out / "importance"
        # importance.only writes importance.safetensors and importance.json (no prune.json)
        self.launch("prune.py", self.common() + ["importance.only=true"], d, "importance.json",
                             "importance (once, reused by every prune)")
        return d / "importance.safetensors"

    def student(self, key: str) -> dict:
        """{"load": checkpoint or None (teacher), "prune_seconds", "plan": path or None}; cached."""
        if key in self.cache:
            c = self.cache[key]
            if isinstance(c, StageError):
                raise c
            return c
        try:
            self.cache[key] = self._student(key)
        except StageError as err:
            self.cache[key] = err
            raise
        return self.cache[key]

    def _student(self, key: str) -> dict:
        s = STUDENTS[key]
        if s.kind == "teacher":
            return {"load": None, "prune_seconds": 0.0, "plan": None}
        if s.kind == "scratch":
            base = self.student(s.like)
            d = self.out / "students" / key
            t0 = time.time()
            self.worker("init", {"like": base["load"], "out_dir": str(d), "seed": 1234,
                                 "config": str(self.args.config)}, d / "init.json",
                        f"random init of the {s.like} shape")
            return {"load": str(d / "checkpoint"), "prune_seconds": time.time() - t0, "plan": None}
        scores = self.importance()
        d = self.out / "students" / key
        overrides = [o.replace("{depth_layers}", str(self.args.depth_layers)) for o in s.overrides]
        res, seconds = self.launch("prune.py", self.common() + [f"importance.scores_path={scores}", *overrides],
                                   d, "prune.json", f"prune {key}")
        info = {"load": str(d / "checkpoint"), "prune_seconds": seconds, "plan": str(d / "prune_plan.json")}
        if s.sparsity is not None:
            z = self.evaluate({"zeros": (info["load"], d / "zeros.json")}, zeros_only=True)["zeros"]
            if "error" in z:
                raise StageError("failed", f"sparsity check: {z['error']}")
            if z["zero_fraction"] < 0.9 * s.sparsity:
                raise StageError("failed", f"{' '.join(o for o in s.overrides if 'sparsity' in o)} was "
                                 f"accepted but the pruned decoder weights are {z['zero_fraction']:.1%} zeros "
                                 "(the sparsity feature has not landed)")
        return info

    def evaluate(self, items: dict[str, tuple[Optional[str], Path]], zeros_only: bool = False) -> dict[str, dict]:
        """{id: (checkpoint or None for the teacher, output json)} -> {id: result}, in one worker process
        for all the items whose output does not exist yet (a failed item: {"error": message})."""
        todo = {k: v for k, v in items.items() if not v[1].is_file()}
        if todo:
            a = self.args
            spec = {"eval_path": a.eval_path, "seq_length": a.seq_length, "num_rows": a.eval_rows,
                    "config": str(a.config), "zeros_only": zeros_only,
                    "items": [{"id": k, "load": load, "out": str(out)} for k, (load, out) in todo.items()]}
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.worker("eval", spec, self.out / "eval" / f"batch-{stamp}-{os.getpid()}.json",
                        ("sparsity check of " if zeros_only else "held-out evaluation of ") + ", ".join(todo))
        return {k: json.loads(out.read_text()) if out.is_file() else {"error": "no result written"}
                for k, (_, out) in items.items()}

    def train_overrides(self, row: Row, student: dict) -> list[str]:
        a = self.args
        steps = steps_for(row.tokens * a.tokens, a.tokens_per_step)
        o = [*self.common(), f"train.train_iters={steps}", f"train.warmup_iters={min(a.warmup, steps // 2)}",
             f"eval.interval={max(1, steps // 2)}"]
        if student["load"]:
            o.append(f"distill.student.load={student['load']}")
        for item in TRAININGS[row.train]:
            if "{pairs}" in item:
                keep = json.loads(Path(student["plan"]).read_text())["keep_layers"]
                item = item.replace("{pairs}", json.dumps(intermediate_pairs(keep)).replace(" ", ""))
            o.append(item)
        return o

    # -- one row ----------------------------------------------------------------------------------------
    def run_row(self, row: Row) -> dict:
        """Build + train the row's model; returns {"load", "prune_seconds", "train_seconds", "tokens",
        "metrics": [metrics.jsonl paths], "notes"}."""
        a = self.args
        if row.train == "iterative":
            steps = steps_for(row.tokens * a.tokens / 2, a.tokens_per_step)
            rounds = "[" + ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in r.items()) + "}"
                                    for r in (WIDTH_MID, WIDTH)) + "]"
            d = self.out / "runs" / row.id
            res, seconds = self.launch("compress.py", [
                *self.common(), f"compress.rounds={rounds}", "compress.teacher=original",
                f"train.train_iters={steps}", f"train.warmup_iters={min(a.warmup, steps // 2)}",
                f"eval.interval={max(1, steps // 2)}"], d, "compress.json", row.id)
            return {"load": res["rounds"][-1]["checkpoint"], "prune_seconds": 0.0, "train_seconds": seconds,
                    "tokens": sum(r["tokens"] for r in res["rounds"]),
                    "metrics": [str(d / f"round{i}" / "distill" / "metrics.jsonl") for i in (1, 2)],
                    "notes": f"includes 2 importance+prune stages; {steps} steps per round"}
        student = self.student(row.student)
        if row.train == "none":
            return {"load": student["load"], "prune_seconds": student["prune_seconds"], "train_seconds": 0.0,
                    "tokens": 0, "metrics": [], "notes": ""}
        overrides = self.train_overrides(row, student)
        extra_seconds, notes = 0.0, ""
        if row.train == "synthetic":
            gen = self.synthetic(steps_for(row.tokens * a.tokens, a.tokens_per_step) * a.tokens_per_step)
            overrides.append(f"data.train_path={gen['output']}")
            extra_seconds = gen["bench_seconds"]
            notes = (f"{gen['generated_tokens']:,} generated tokens ({gen['num_prompts']} prompts), "
                     f"generation {extra_seconds:.0f} s included")
        d = self.out / "runs" / row.id
        res, seconds = self.launch("distill.py", overrides, d, "distill.json", row.id)
        return {"load": res["checkpoint"], "prune_seconds": student["prune_seconds"],
                "train_seconds": seconds + extra_seconds, "tokens": res["tokens"],
                "metrics": [str(d / "metrics.jsonl")], "notes": notes}

    def synthetic(self, tokens: int) -> dict:
        """Teacher continuations of corpus prompts, about `tokens` tokens in all (launch/generate.py)."""
        prompt, new = 32, 96
        n = max(1, math.ceil(1.05 * tokens / (prompt + new)))
        d = self.out / "synthetic"
        res, seconds = self.launch("generate.py", [
            *self.common(), f"generate.num_prompts={n}", f"generate.prompt_length={prompt}",
            f"generate.max_new_tokens={new}", "generate.batch_size=32"], d, "generate.json",
            f"synthetic data ({n} prompts x ({prompt} + {new}) tokens)")
        return {**res, "bench_seconds": seconds}

    # -- everything -------------------------------------------------------------------------------------
    def run(self, rows: list[Row]) -> dict:
        results: dict[str, dict] = {}
        for row in rows:
            r: dict = {"label": row.label, "student": row.student, "train": row.train, "tokens": 0}
            try:
                r.update(self.run_row(row))
                r["status"] = "ok"
            except StageError as err:
                r["status"] = f"{err.kind}: {err.msg}"
            results[row.id] = r
        ok = [row for row in rows if results[row.id]["status"] == "ok"]
        try:  # held-out evaluation of every row, per eval row
            evals = self.evaluate({row.id: (results[row.id]["load"], self.out / "eval" / f"{row.id}.json")
                                   for row in ok})
        except StageError as err:
            evals = {row.id: {"error": err.msg} for row in ok}
        for row in ok:
            r, ev = results[row.id], evals[row.id]
            if "error" in ev:
                r["status"] = f"failed: evaluation: {ev['error']}"
                continue
            r.update(row_losses=ev["row_losses"], loss=ev["loss"], ppl=math.exp(ev["loss"]),
                     loss_se=std_err(ev["row_losses"]), params=ev["params"],
                     params_non_embedding=ev["params_non_embedding"], zero_fraction=ev["zero_fraction"],
                     eval_tokens=ev["tokens"])
            if STUDENTS[row.student].sparsity is not None:
                r["notes"] = "; ".join(x for x in (r.get("notes"), f"{ev['zero_fraction']:.1%} of decoder "
                                                   "linear weights are zero") if x)
        return results


# --------------------------------------------------------------------------------------------------
# workers (run in a subprocess: they initialise torch.distributed / megatron)
# --------------------------------------------------------------------------------------------------
def _worker_eval(spec: dict) -> dict:
    """Each item's model scored on the same held-out rows, one row at a time (evaluate_rows), so the
    loss comes with per-row losses; writes item["out"] per item (an item that fails: {"error"})."""
    import gc
    import traceback

    from megaslim.commands.cli import write_json
    from megaslim.config import load_config
    from megaslim.data.corpora import data_path
    from megaslim.data.packing import pack_rows, read_documents
    from megaslim.runtime import init_runtime
    from megaslim.sources import resolve_source
    from megaslim.tokenizer import load_tokenizer

    cfg = load_config(spec["config"])
    teacher = resolve_source(cfg.model.load)
    rows = path = None
    if not spec.get("zeros_only"):
        tokenizer = load_tokenizer(cfg.model, teacher)  # the teacher's: the same rows for every model
        path = data_path(spec["eval_path"], "data.eval_path")
        rows = pack_rows(read_documents(path), tokenizer, seq_length=spec["seq_length"],
                         num_rows=spec["num_rows"], what=f"data.eval_path={path}")
    init_runtime(tp=1, pp=1, seed=cfg.train.seed)
    done = {}
    for item in spec["items"]:
        try:
            res = _eval_one(cfg, resolve_source(item["load"]) if item["load"] else teacher, rows)
            if path is not None:
                res["eval_path"] = str(path)
        except Exception as err:  # noqa: BLE001 - one model's failure is that row's status
            traceback.print_exc()
            res = {"error": f"{type(err).__name__}: {err}"}
        write_json(item["out"], res)
        done[item["id"]] = "error" not in res
        gc.collect()
    return done


def _eval_one(cfg, source, rows) -> dict:
    import torch

    from megaslim.eval import evaluate_rows
    from megaslim.sources import load_model

    model, arch, _ = load_model(cfg.model, source)
    zeros = total = 0
    for name, p in model.named_parameters():
        if "decoder.layers" in name and p.dim() == 2:
            zeros += int((p == 0).sum())
            total += p.numel()
    out = {"params": arch.num_params(), "params_non_embedding": arch.num_params() - arch.vocab_size * arch.hidden_size,
           "zero_fraction": zeros / max(total, 1), "model": source.label}
    if rows is None:
        return out
    per_row, row_tokens = [], []
    with torch.no_grad():
        for i in range(rows.shape[0]):
            r = evaluate_rows(model, rows[i:i + 1], vocab_size=arch.vocab_size, micro_batch_size=1)
            per_row.append(r["loss"])
            row_tokens.append(r["tokens"])
    del model
    tokens = sum(row_tokens)  # the pinned protocol's loss: mean over every predicted token
    return {**out, "row_losses": per_row, "row_tokens": row_tokens, "tokens": tokens,
            "loss": sum(x * n for x, n in zip(per_row, row_tokens)) / tokens}


def _worker_init(spec: dict) -> dict:
    """A random-init checkpoint of the shape of spec["like"] (megaslim's build_gpt initialisation)."""
    import torch

    from megaslim.checkpoint import save_checkpoint
    from megaslim.config import load_config
    from megaslim.model.build import build_gpt
    from megaslim.runtime import init_runtime
    from megaslim.sources import resolve_source, source_arch

    cfg = load_config(spec["config"])
    like = resolve_source(spec["like"])
    arch = source_arch(like)
    init_runtime(tp=1, pp=1, seed=spec["seed"])
    torch.manual_seed(spec["seed"])
    model = build_gpt(arch, cfg.model, init_weights=True)
    tok_dir = like.tokenizer_dir or resolve_source(cfg.model.load).tokenizer_dir
    path = save_checkpoint(model, arch, Path(spec["out_dir"]) / "checkpoint", 0, tokenizer_dir=tok_dir,
                           extra={"random_init_like": spec["like"], "seed": spec["seed"]})
    return {"checkpoint": str(path.parent), "params": arch.num_params()}


def worker_main(mode: str, spec_path: str) -> None:
    from megaslim.commands.cli import write_json
    from megaslim.runtime import main_guard

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec_path).with_name(Path(spec_path).name.replace(".spec.json", ".json"))

    def main():
        result = {"eval": _worker_eval, "init": _worker_init}[mode](spec)
        write_json(out, result)

    main_guard(main)


# --------------------------------------------------------------------------------------------------
# figure, machine, main
# --------------------------------------------------------------------------------------------------
def plot_curves(results: dict[str, dict], path: Path) -> Optional[Path]:
    from megaslim.figures import pyplot, save_png

    curves = []
    for rid, r in results.items():
        if r.get("status") != "ok" or r["train"] not in ("kd", "kd_inter", "kd_contrastive", "iterative"):
            continue
        recs, offset = [], 0
        for mpath in r.get("metrics", []):
            p = Path(mpath)
            if not p.is_file():
                continue
            part = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            for rec in part:
                recs.append({**rec, "tokens": rec.get("tokens", 0) + offset})
            offset = max([rec.get("tokens", 0) for rec in part] + [0]) + offset
        if recs:
            curves.append((rid, recs))
    if not curves:
        return None
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4))
    for rid, recs in curves:
        tr = [(x["tokens"], x.get("kd_loss", x.get("loss"))) for x in recs if "loss" in x]
        ev = [(x["tokens"], x["eval_loss"]) for x in recs if "eval_loss" in x]
        if tr:
            ax1.plot(*zip(*tr), label=rid)
        if ev:
            ax2.plot(*zip(*ev), "o-", label=rid)
    ax1.set(xlabel="training tokens", ylabel="logit KD loss (KL)", title="distillation: training KD loss")
    ax2.set(xlabel="training tokens", ylabel="held-out loss", title="distillation: held-out loss")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save_png(fig, path)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or str(os.cpu_count())
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{nproc} cores (nproc), {model}{gpu}, torch {torch.__version__}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help=f"2-CPU-core preset: seq {SMALL_SEQ}, "
                    f"{SMALL_EVAL_ROWS} eval rows, T = {SMALL_TOKENS} tokens")
    ap.add_argument("--tokens", type=int, help="T, training tokens per 'T' row (default: --small "
                    f"{SMALL_TOKENS}; else the config's train_iters x global batch x seq)")
    ap.add_argument("--eval-path", help="held-out .jsonl (\"text\") / .txt (default: the default valid split)")
    ap.add_argument("--eval-rows", type=int, help=f"held-out rows (default: --small {SMALL_EVAL_ROWS}; else 64)")
    ap.add_argument("--seq-length", type=int, help=f"default: --small {SMALL_SEQ}; else the config's")
    ap.add_argument("--rows", help="comma-separated row ids or globs (e.g. 'teacher,width_*'); default all")
    ap.add_argument("--depth-layers", type=int, default=DEPTH_LAYERS)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--out-dir", default="/tmp/megaslim_table", help="run outputs (reused on a rerun)")
    ap.add_argument("--docs-dir", default=str(ROOT / "docs"), help="where results.md/.json/_loss_curves.png go")
    ap.add_argument("--no-docs", action="store_true", help="write the results into --out-dir only")
    ap.add_argument("--retry-failed", action="store_true", help="rerun stages that failed or were refused before")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="OMP_NUM_THREADS")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def resolve_settings(args) -> None:
    """Fill the preset-dependent defaults from --small and the config."""
    sys.path.insert(0, str(ROOT))
    from megaslim.config import load_config

    cfg = load_config(args.config)
    t = cfg.train
    args.seq_length = args.seq_length or (SMALL_SEQ if args.small else cfg.data.seq_length)
    args.eval_rows = args.eval_rows or (SMALL_EVAL_ROWS if args.small else 64)
    args.tokens_per_step = t.global_batch_size * args.seq_length
    args.tokens = args.tokens or (SMALL_TOKENS if args.small else t.train_iters * args.tokens_per_step)
    args.warmup, args.lr, args.min_lr = t.warmup_iters, t.lr, t.min_lr
    args.micro_batch_size, args.global_batch_size = t.micro_batch_size, t.global_batch_size
    if args.eval_path:
        args.eval_path = str(Path(args.eval_path).resolve())


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(ROOT))
        worker_main(*args.worker)
        return
    if args.list:
        for r in ROWS:
            print(f"{r.id:18s} {r.label}")
        return
    rows = select_rows(args.rows)
    resolve_settings(args)
    t0 = time.time()
    bench = Bench(args)
    results = bench.run(rows)
    steps_T = steps_for(args.tokens, args.tokens_per_step)
    command = "python bench/minitron_table.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    doc = {
        "meta": {"command": command,
                 "machine": machine(), "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                 "wall_seconds": time.time() - t0, "tokens": steps_T * args.tokens_per_step, "steps_T": steps_T,
                 "tokens_per_step": args.tokens_per_step, "seq_length": args.seq_length,
                 "micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size,
                 "lr": args.lr, "min_lr": args.min_lr, "eval_rows": args.eval_rows,
                 "eval_path": args.eval_path or "the default validation split",
                 "config": os.path.relpath(args.config, ROOT), "depth_layers": args.depth_layers,
                 "out_dir": str(args.out_dir)},
        "reference": REFERENCE, "order": [r.id for r in rows], "rows": results,
        "claims": [{"topic": c.topic, "paper": c.paper, "a": c.a, "b": c.b, "expect": c.expect,
                    **verdict(c, results)} for c in CLAIMS],
        "effects": [],
    }
    for label, a, b in EFFECTS:
        ra, rb = results.get(a, {}), results.get(b, {})
        if ra.get("row_losses") and rb.get("row_losses"):
            p = paired(ra["row_losses"], rb["row_losses"])
            doc["effects"].append({"label": label, "a": a, "b": b, **p,
                                   "text": compare_text(ra["label"], rb["label"], p) + "."})
    docs = Path(args.out_dir) if args.no_docs else Path(args.docs_dir)
    fig = plot_curves(results, docs / "results_loss_curves.png")
    if fig is None:
        doc["notes"] = ["no distillation run finished: no loss curves"]
    from megaslim.commands.cli import atomic_write_text, write_json

    write_json(docs / "results.json", doc)
    text = render_markdown(doc)
    atomic_write_text(docs / "results.md", text)
    print(text)


if __name__ == "__main__":
    main()

"""Benchmark: SmolLM2-135M depth-pruned 30 -> 15 layers by prune.layer_metric, without retraining and
after the same short logit KD from the unpruned teacher.

python bench/depth_pruning.py [--calib-rows 32] [--loss-rows 8] [--greedy-rows 8] [--eval-rows 32] [--kd-steps 30]
Model and target from configs/smollm2_prune_depth.yaml. Calibration: two disjoint draws of rows of the
default corpus's train split (Shakespeare + KJV Bible). Evaluation: held-out text of another kind (the
license texts of /usr/share/common-licenses: legal English, never calibrated on) and the corpus's valid split
(Hamlet, Macbeth, three Bible books). Each method's plan is built by megaslim.prune.plan.build_plan from its
scores; losses come from the pruned layer list (equal to the pruned model's loss to 1e-5, tests/test_depth.py).
Writes docs/bench_depth.md (raw results under outputs/; `--render FILES` merges runs of separate processes,
e.g. one per draw or method). Cost in full forward passes of one row: per draw, bi 1 x rows, block_loss about
8 x rows, loss 19 x loss-rows (from the cache), greedy_loss about 67 x greedy-rows, each evaluation 0.6 x rows.
--kd-steps N: each pruned student then gets N steps of logit KD (megaslim.distill.train.Trainer, the trainer of
launch/distill.py: forward KL, temperature 1, no LM loss; micro-batch = global batch = --kd-batch rows of the
default train split, the same seed and so the same batches for every student, LR --kd-lr cosine to a tenth,
4 warmup steps) and is scored on the same held-out rows again. --plans FILE: take the dropped layers of the
runs in an earlier result JSON instead of scoring them again (their seconds are the earlier run's).
"""
import argparse
import copy
import json
import math
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from megaslim.config import ImportanceConfig, load_config
from megaslim.data.calibration import calibration_rows
from megaslim.data.corpora import data_path
from megaslim.data.heldout import heldout_rows
from megaslim.data.indexed import cached_indexed
from megaslim.data.loaders import train_micro_batches
from megaslim.data.packing import pack_rows
from megaslim.distill.train import Models, Trainer, step_batches
from megaslim.importance.calibrate import activation_scores
from megaslim.importance.depth import LayerRunner, _batches, block_loss_scores, greedy_loss_order
from megaslim.importance.scores import ImportanceScores
from megaslim.io import atomic_write_text
from megaslim.prune.apply import prune_in_memory
from megaslim.prune.plan import build_plan
from megaslim.runtime import init_runtime
from megaslim.sources import load_model, resolve_source
from megaslim.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LICENSES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-3", "Artistic", "GPL-2", "LGPL-2.1")
METHODS = ("bi", "loss", "block_loss", "greedy_loss")
SHORTGPT_REFERENCE = 9.63  # issue 19: ShortGPT BI on the issue author's held-out text


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2_prune_depth.yaml"))
    ap.add_argument("--calib-rows", type=int, default=32, help="rows per calibration draw (bi, block_loss)")
    ap.add_argument("--loss-rows", type=int, default=8, help="rows of each draw for the per-layer loss metric")
    ap.add_argument("--greedy-rows", type=int, default=8, help="rows of each draw for greedy_loss")
    ap.add_argument("--eval-rows", type=int, default=32)
    ap.add_argument("--valid-rows", type=int, default=16, help="rows of the default valid split")
    ap.add_argument("--greedy-draws", default="AB", help="the draws greedy_loss runs on (it costs the most)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated layer metrics to run")
    ap.add_argument("--draws", default="AB", help="the calibration draws this process runs (A, B or AB)")
    ap.add_argument("--kd-steps", type=int, default=0, help="logit-KD steps for each pruned student (0: none)")
    ap.add_argument("--kd-batch", type=int, default=4, help="rows per KD step (micro-batch = global batch)")
    ap.add_argument("--kd-lr", type=float, default=1e-3, help="KD peak LR (cosine to a tenth, 4 warmup steps)")
    ap.add_argument("--plans", help="an earlier result JSON: its runs' dropped layers are reused, not re-scored")
    ap.add_argument("--render", nargs="*", help="only merge these result JSON files into --out")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_depth.md"))
    return ap.parse_args(argv)


def license_rows(tokenizer, seq_length: int, n: int) -> torch.Tensor:
    docs = [Path("/usr/share/common-licenses", name).read_text() for name in LICENSES]
    return pack_rows(docs, tokenizer, seq_length=seq_length, num_rows=n, what="license texts")


def row_losses(runner: LayerRunner, rows: torch.Tensor, keep: list[int], mbs: int) -> torch.Tensor:
    """[n] mean token loss of each row through the kept layers only."""
    out = []
    with torch.no_grad():
        for batch in _batches(rows, mbs):
            c = runner.cache(batch, keep)
            out.append(runner.row_losses(c, c.states[len(keep)]))
    return torch.cat(out)[: len(rows)]


def method_scores(model, arch, draw: torch.Tensor, args, drop: int, greedy: bool) -> dict:
    """{method: (ImportanceScores with that method's tensor, seconds)} on one calibration draw, for the
    methods of args.methods (greedy_loss only where `greedy`)."""
    L = arch.num_layers  # widths stay: their scores only need the right shapes
    zeros = dict(heads=torch.zeros(L, arch.num_attention_heads), query_groups=torch.zeros(L, arch.num_query_groups),
                 neurons=torch.zeros(L, arch.ffn_hidden_size), channels=torch.zeros(arch.hidden_size),
                 layer_bi=torch.zeros(L))
    wanted, out = args.methods.split(","), {}

    def timed(name, fn):
        if name in wanted and (name != "greedy_loss" or greedy):
            t0 = time.time()
            extra = fn()
            out[name] = (ImportanceScores(**{**zeros, **extra}), time.time() - t0)

    timed("bi", lambda: {"layer_bi": activation_scores(model, arch, draw, ImportanceConfig(),
                                                       micro_batch_size=args.micro_batch)["layer_bi"]})
    # the same numbers as layer_loss_scores (one skipped layer each; tests/test_depth.py), ~40% cheaper
    timed("loss", lambda: {"layer_loss": block_loss_scores(model, arch, draw[: args.loss_rows], drop=1,
                                                           micro_batch_size=args.micro_batch)[0]})
    timed("block_loss", lambda: {"layer_block_loss": block_loss_scores(
        model, arch, draw, drop=drop, micro_batch_size=args.micro_batch),
        "settings": {"block_drop": drop, "layer_blocks": 1}})
    timed("greedy_loss", lambda: {"layer_greedy": greedy_loss_order(
        model, arch, draw[: args.greedy_rows], drop=drop, micro_batch_size=args.micro_batch)[0]})
    return out


def kd_student(cfg, model, arch, plan, train_prefix: str, tok, args) -> tuple[object, float]:
    """The plan's student after args.kd_steps steps of logit KD from `model` (its own copy; `model` is not
    changed), in eval mode, and the seconds the steps took. Every student sees the same batches."""
    from megatron.core import parallel_state as ps

    c = copy.deepcopy(cfg)
    c.output_dir, c.resume = str(ROOT / "outputs" / "bench_depth_kd"), False
    t = c.train
    t.train_iters, t.lr_decay_iters, t.warmup_iters = args.kd_steps, None, min(4, args.kd_steps // 2)
    t.micro_batch_size = t.global_batch_size = args.kd_batch
    t.lr, t.min_lr = args.kd_lr, args.kd_lr / 10
    student = prune_in_memory(model, plan, cfg.model)
    t0 = time.time()
    trainer = Trainer(c, Models(student, plan.target_arch, model, arch), tokenizer_dir=None, eval_rows=None)
    data = train_micro_batches(train_prefix, tok, seq_length=c.data.seq_length, micro_batch_size=t.micro_batch_size,
                               global_batch_size=t.global_batch_size, train_iters=t.train_iters,
                               dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                               seed=t.seed, cache_path=ROOT / "outputs" / "bench_depth_kd" / "data_cache")
    for i in range(t.train_iters):
        m = trainer.train_step(step_batches(data, trainer.num_micro))
        print(f"  kd step {i + 1}/{t.train_iters}: loss {m['loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    del trainer
    student.eval()
    return student, time.time() - t0


def choices(model, arch, draws: dict, args, keep_n: int) -> list[dict]:
    """[{draw, method, rows, dropped, seconds}] for every draw and method asked: scored now, or taken from
    --plans (the runs of an earlier result JSON with the same draw, method and rows)."""
    earlier = json.loads(Path(args.plans).read_text())["runs"] if args.plans else []
    rows_of = {"bi": args.calib_rows, "block_loss": args.calib_rows, "loss": args.loss_rows,
               "greedy_loss": args.greedy_rows}
    full, target, out = list(range(arch.num_layers)), replace(arch, num_layers=keep_n), []
    for name, draw in ((n, d) for n, d in draws.items() if n in args.draws):
        wanted = [m for m in args.methods.split(",") if m != "greedy_loss" or name in args.greedy_draws]
        for method in wanted:
            old = [r for r in earlier if (r["draw"], r["method"], r.get("rows")) == (name, method, rows_of[method])]
            if old:
                out.append({k: old[0][k] for k in ("draw", "method", "rows", "dropped", "seconds")} | {"reused": True})
                print(f"draw {name} {method}: dropped layers reused from {args.plans}", flush=True)
        todo = copy.copy(args)
        todo.methods = ",".join(m for m in wanted if not any(r["draw"] == name and r["method"] == m for r in out))
        for method, (scores, seconds) in method_scores(model, arch, draw, todo, arch.num_layers - keep_n,
                                                       True).items():
            plan = build_plan(arch, target, scores, layer_metric=method)
            out.append({"draw": name, "method": method, "rows": rows_of[method], "seconds": seconds,
                        "dropped": sorted(set(full) - set(plan.keep_layers))})
            print(json.dumps(out[-1]), flush=True)
    return out


def measure(args, raw: Path) -> dict:
    cfg = load_config(args.config, [])
    init_runtime()
    source = resolve_source(cfg.model.load)
    model, arch, _ = load_model(cfg.model, source)
    tok = load_tokenizer(cfg.model, source)
    seq, keep_n = cfg.data.seq_length, cfg.prune.export_config.num_layers
    calib = calibration_rows(cfg.data.calib_path, tok, num_samples=2 * args.calib_rows, seq_length=seq)
    draws = {"A": calib[: args.calib_rows], "B": calib[args.calib_rows:]}
    evals = {"licenses": license_rows(tok, seq, args.eval_rows)}
    if args.valid_rows:  # 0: the held-out text of another kind only
        evals["valid split"] = heldout_rows(cfg.data.eval_path, tok, seq_length=seq, num_samples=args.valid_rows)
    runner, target = LayerRunner(model, arch.vocab_size), replace(arch, num_layers=keep_n)
    full = list(range(arch.num_layers))
    res = {"base": {e: row_losses(runner, r, full, args.micro_batch).tolist() for e, r in evals.items()}
           if "bi" in args.methods else {}, "runs": choices(model, arch, draws, args, keep_n)}
    print("unpruned:", {e: round(sum(v) / len(v), 4) for e, v in res["base"].items()}, flush=True)
    res["settings"] = {"calib_rows": args.calib_rows, "loss_rows": args.loss_rows, "greedy_rows": args.greedy_rows,
                       "eval_rows": args.eval_rows, "valid_rows": args.valid_rows,
                       "greedy_draws": args.greedy_draws, "seq_length": seq, "keep": keep_n, "host": platform.node(),
                       "threads": torch.get_num_threads(), "kd_steps": args.kd_steps, "kd_batch": args.kd_batch,
                       "kd_lr": args.kd_lr}
    train_prefix = cached_indexed(data_path(cfg.data.train_path, "data.train_path"), tok) if args.kd_steps else None
    for i, run in enumerate(res["runs"]):
        plan = build_plan(arch, target, None, drop_layers=run["dropped"])
        run["losses"] = {e: row_losses(runner, r, plan.keep_layers, args.micro_batch).tolist()
                         for e, r in evals.items()}
        print(run["draw"], run["method"], {e: round(sum(v) / len(v), 4) for e, v in run["losses"].items()}, flush=True)
        atomic_write_text(raw, json.dumps({**res, "runs": res["runs"][: i + 1]}, indent=1))
        if args.kd_steps:
            student, seconds = kd_student(cfg, model, arch, plan, train_prefix, tok, args)
            s_runner, s_keep = LayerRunner(student, arch.vocab_size), list(range(keep_n))
            run["kd"] = {"steps": args.kd_steps, "seconds": seconds, "losses": {
                e: row_losses(s_runner, r, s_keep, args.micro_batch).tolist() for e, r in evals.items()}}
            print(run["draw"], run["method"], "after KD",
                  {e: round(sum(v) / len(v), 4) for e, v in run["kd"]["losses"].items()}, flush=True)
            del student, s_runner
        # the runs measured so far, for --render, should a slow machine stop the rest
        atomic_write_text(raw, json.dumps({**res, "runs": res["runs"][: i + 1]}, indent=1))
    return res


def _mean_se(values: list[float], ref: list[float]) -> str:
    d = torch.tensor(values, dtype=torch.float64) - torch.tensor(ref, dtype=torch.float64)
    se = d.std(unbiased=True).item() / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return f"{sum(values) / len(values):.3f} ({d.mean().item():+.3f} ± {se:.3f})"


def _cell(values: list[float], ref: Optional[list[float]]) -> str:
    return _mean_se(values, ref) if ref is not None else f"{sum(values) / len(values):.3f}"


def _label(r: dict) -> str:
    return f"{r['method']} ({r['rows']} rows)" if r["method"] == "greedy_loss" else r["method"]


def _runs(res: dict) -> list[dict]:
    """Each (draw, method, rows) once (the runs of several KD lengths share their no-retraining numbers)."""
    seen, out = set(), []
    for r in sorted(res["runs"], key=lambda r: (r["draw"], METHODS.index(r["method"]), r["rows"])):
        if (r["draw"], r["method"], r["rows"]) not in seen:
            seen.add((r["draw"], r["method"], r["rows"]))
            out.append(r)
    return out


def _ref(runs: list[dict], draw: str, method: str) -> Optional[dict]:
    return next((r for r in runs if (r["draw"], r["method"]) == (draw, method)), None)


def render(res: dict) -> str:
    s = res["settings"]
    evals = list(res["base"]) or (list(res["runs"][0]["losses"]) if res["runs"] else [])
    lines = [
        "# Depth pruning: SmolLM2-135M, 30 -> 15 layers, by prune.layer_metric (bench/depth_pruning.py)", "",
        f"Calibration: two disjoint draws (A, B) of {s['calib_rows']} x {s['seq_length']} rows of the default train "
        "split; `greedy_loss` (5 rounds of 3 layers) and `loss` (when run) on the first `rows` of a draw, `bi` "
        f"and `block_loss` on all of them. Evaluation: {s['eval_rows']} x {s['seq_length']} rows of each held-out "
        "text; mean token loss, and in brackets the paired difference to `bi` of the same draw ± its standard error "
        "over rows. Lower is better. Scoring seconds: wall time of the method's scoring on its draw (the evaluation "
        "not included; `*`: taken with the dropped layers from an earlier run, --plans).", "",
        "## No retraining", "",
        "| draw | metric | rows | dropped layers | " + " | ".join(evals) + " | scoring seconds |",
        "|---|---|---|---|" + "---|" * len(evals) + "---|",
    ]
    if res["base"]:
        lines.append("| - | unpruned | - | - | " + " | ".join(f"{sum(v) / len(v):.3f}" for v in res["base"].values())
                     + " | - |")
    for r in _runs(res):
        ref = _ref(_runs(res), r["draw"], "bi")
        cells = [_cell(r["losses"][e], ref["losses"][e] if ref else None) for e in evals]
        lines.append(f"| {r['draw']} | {_label(r)} | {r['rows']} | {r['dropped']} | " + " | ".join(cells)
                     + f" | {r['seconds']:.0f}{'*' if r.get('reused') else ''} |")
    lines += _against_block(_runs(res), evals, lambda r: r["losses"])
    steps = sorted({r["kd"]["steps"] for r in res["runs"] if "kd" in r})
    kd = [line for n in steps for line in _kd_table(res, evals, n)]
    return "\n".join(lines + (kd or ["", "After KD: not measured in this run (--kd-steps 0)."]) + _stability(res, s))


def _against_block(runs: list[dict], evals: list[str], losses) -> list[str]:
    """greedy_loss runs against block_loss of the same draw, paired."""
    out = []
    for r in (r for r in runs if r["method"] == "greedy_loss"):
        ref = _ref(runs, r["draw"], "block_loss")
        if ref is not None and losses(r) is not None and losses(ref) is not None:
            out += [f"- draw {r['draw']}, {_label(r)}, {e}: " + _mean_se(losses(r)[e], losses(ref)[e]) for e in evals]
    return ["", "greedy_loss against block_loss (paired difference ± standard error over rows):", ""] + out if out \
        else []


def _kd_table(res: dict, evals: list[str], steps: int) -> list[str]:
    """The runs distilled for `steps` steps, paired against bi of the same draw and KD length."""
    kd = [r for r in sorted(res["runs"], key=lambda r: (r["draw"], METHODS.index(r["method"]), r["rows"]))
          if r.get("kd", {}).get("steps") == steps]
    s = res["settings"]
    lines = ["", f"## After {steps} steps of logit KD from the unpruned teacher", "",
             f"Each pruned student: {steps} steps of {s['kd_batch']} x {s['seq_length']} tokens of the default train "
             f"split (the same batches for all), forward KL at temperature 1, no LM loss, LR {s['kd_lr']:g} cosine "
             "to a tenth after min(4, steps / 2) warmup steps (megaslim.distill.train.Trainer, the trainer of "
             "launch/distill.py). The same held-out rows; in brackets the paired difference to `bi` of the same "
             "draw after the same KD ± its standard error over rows. KD seconds: wall time of the steps.", "",
             "| draw | metric | rows | " + " | ".join(f"{e} before KD" for e in evals) + " | "
             + " | ".join(f"{e} after KD" for e in evals) + " | KD seconds |",
             "|---|---|---|" + "---|" * (2 * len(evals)) + "---|"]
    for r in kd:
        ref = _ref(kd, r["draw"], "bi")
        ref_kd = ref["kd"]["losses"] if ref and "kd" in ref else None
        before = [f"{sum(r['losses'][e]) / len(r['losses'][e]):.3f}" for e in evals]
        after = [_cell(r["kd"]["losses"][e], ref_kd[e] if ref_kd else None) for e in evals]
        lines.append(f"| {r['draw']} | {_label(r)} | {r['rows']} | " + " | ".join(before + after)
                     + f" | {r['kd']['seconds']:.0f} |")
    return lines + _against_block(kd, evals, lambda r: r["kd"]["losses"])


def _stability(res: dict, s: dict) -> list[str]:
    lines = ["", "Stability (layers dropped by both draws with the same rows, of 15):", ""]
    for m in METHODS:
        for rows in sorted({r["rows"] for r in res["runs"] if r["method"] == m}):
            a, b = ([r["dropped"] for r in res["runs"] if (r["method"], r["rows"], r["draw"]) == (m, rows, d)]
                    for d in "AB")
            if a and b:
                lines.append(f"- {m} ({rows} rows): {len(set(a[0]) & set(b[0]))}")
    missing = [m for m in METHODS if m not in {r["method"] for r in res["runs"]}]
    if missing:
        lines += ["", f"Not measured in this run: {', '.join(missing)}."]
    return lines + ["", f"Machine: {s['host']}, {s['threads']} threads, shared with other jobs (seconds are noisy).",
                    ""]


def merge(paths: list[str]) -> dict:
    """Results of several processes (one per draw) as one."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    return {"base": next((p["base"] for p in parts if p["base"]), {}), "settings": parts[0]["settings"],
            "runs": [r for p in parts for r in p["runs"]]}


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        res = merge(args.render)
    else:
        tag = f"{args.draws}_{args.methods.replace(',', '_')}_g{args.greedy_rows}_kd{args.kd_steps}"
        raw = ROOT / "outputs" / f"bench_depth_{tag}.json"  # for --render and --plans
        res = measure(args, raw)
        atomic_write_text(raw, json.dumps(res, indent=1))
    atomic_write_text(Path(args.out), render(res))
    print(render(res))


if __name__ == "__main__":
    main()

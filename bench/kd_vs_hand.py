"""Benchmark: megaslim's KD step against a hand-written transformers KD loop, side by side in one run.

python bench/kd_vs_hand.py [--shapes 8x128,4x512] [--repeats 3] [--profile 8x128] [--core-attention sdpa]
Same teacher (SmolLM2-135M), same student (pruned in memory to hidden 468 / ffn 750, exported to HF for the
hand loop), same token batches. Each shape runs in its own process; inside it the six measurements (teacher
forward, student step, KD step, for each loop) are interleaved, so a noisy shared machine slows both alike.
Reports median step time, tokens/s, peak RSS during the KD steps, each loop's KD step / (its student step +
its teacher forward), and megaslim / hand; `--profile` adds a per-phase and per-op breakdown. Writes the
"KD step vs a hand-written loop" section of docs/bench_distill.md.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.distill_overhead import ZeroTeacher, replace_section  # noqa: E402
from megaslim.config import ExportConfigShape, load_config  # noqa: E402
from megaslim.data.calibration import calibration_rows  # noqa: E402
from megaslim.distill.train import Models, Trainer  # noqa: E402
from megaslim.importance.scores import ImportanceScores  # noqa: E402
from megaslim.model.forward import make_microbatches, run_forward  # noqa: E402
from megaslim.prune.plan import build_plan, target_shape  # noqa: E402
from megaslim.prune.student import student_from_plan  # noqa: E402
from megaslim.runtime import init_runtime  # noqa: E402
from megaslim.sources import load_model, resolve_source  # noqa: E402
from megaslim.tokenizer import load_tokenizer  # noqa: E402

SECTION = "## KD step vs a hand-written loop"
LOOPS = ("megaslim", "before", "hand")  # before: megaslim before issue 18 (megatron attention + RoPE, old KL)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8x128,4x512", help="comma-separated BATCHxSEQ")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", default="8x128", help="shapes (BATCHxSEQ, comma-separated) that also get a "
                    "per-phase / per-op breakdown of one KD step; '' for none")
    ap.add_argument("--core-attention", default="sdpa", choices=["sdpa", "local"])
    ap.add_argument("--parallel", action="store_true", help="run the shapes' processes at the same time "
                    "(on a machine already shared with many jobs this halves the wall time; ratios stay in-process)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one shape, print its JSON
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_distill.md"))
    return ap.parse_args(argv)


# -- setup ------------------------------------------------------------------------------------------
@dataclass
class Loops:
    cfg: object
    teacher: object  # megatron teacher
    trainer: object  # megaslim KD Trainer of the pruned student
    hf_teacher: object
    hf_student: object
    hf_opt: object
    batch: list  # megaslim micro-batches (one)
    tokens: torch.Tensor  # the same tokens for the hand loop
    zero_teacher: object = None
    old_cores: dict = field(default_factory=dict)  # megatron's DotProductAttention per attention module


def build_loops(b: int, s: int, core_attention: str) -> Loops:
    from transformers import AutoModelForCausalLM

    from megaslim.model.hf import export_hf

    cfg = load_config(None, [f"data.seq_length={s}", f"train.micro_batch_size={b}", f"train.global_batch_size={b}",
                             "train.train_iters=100", "train.warmup_iters=1", f"model.core_attention={core_attention}",
                             "output_dir=/tmp/megaslim_bench_kd_vs_hand"])
    init_runtime()
    source = resolve_source(None)
    teacher, arch, _ = load_model(cfg.model, source)
    rows = calibration_rows(None, load_tokenizer(cfg.model, source), num_samples=b, seq_length=s)
    L = arch.num_layers  # a plan from uniform scores: the shape, not the choice, sets the cost
    flat = ImportanceScores(heads=torch.ones(L, 9), query_groups=torch.ones(L, 3), neurons=torch.ones(L, 1536),
                            channels=torch.ones(576), layer_bi=torch.ones(L))
    target = target_shape(arch, ExportConfigShape(hidden_size=468, ffn_hidden_size=750), tp=1, hf_export=True)
    student = student_from_plan(teacher, build_plan(arch, target, flat), cfg.model)
    with tempfile.TemporaryDirectory() as tmp:  # the hand loop's student: the same weights, as HF
        export_hf(student, target, Path(tmp) / "student", tokenizer_dir=None)
        hf_student = AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "student"), dtype=torch.float32)
    hf_teacher = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32).eval()
    for p in hf_teacher.parameters():
        p.requires_grad_(False)
    hf_student.train()
    t = cfg.train
    hf_opt = torch.optim.AdamW(hf_student.parameters(), lr=t.lr, betas=(0.9, 0.95), eps=1e-8,
                               weight_decay=t.weight_decay)
    trainer = Trainer(cfg, Models(student, target, teacher, arch), tokenizer_dir=None, eval_rows=None)
    batch = make_microbatches(rows, b)
    return Loops(cfg, teacher, trainer, hf_teacher, hf_student, hf_opt, batch, batch[0]["tokens"],
                 ZeroTeacher(teacher), megatron_cores([student, teacher]))


# -- megaslim as it was before issue 18 (for the before/after rows) ---------------------------------
# A re-implementation on purpose: the "before" leg must run the old loss code, which megaslim no longer has.
class _OldForwardKL(torch.autograd.Function):
    """The fused forward KL before issue 18 (eight [tokens, vocab] tensors), kept here to measure against."""

    @staticmethod
    def forward(ctx, student, teacher):
        log_p, log_q = _old_log_softmax(teacher), _old_log_softmax(student)
        p = log_p.exp()
        kl = (p * (log_p - log_q)).sum(dim=-1)
        ctx.save_for_backward(log_q.exp_().sub_(p))
        return kl

    @staticmethod
    def backward(ctx, grad):
        (q_minus_p,) = ctx.saved_tensors
        return grad.unsqueeze(-1) * q_minus_p, None


@torch.no_grad()
def _old_log_softmax(logits):
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def _old_prepare(logits, temperature, vocab_size):
    from megaslim.model.logits import mask_padded_vocab

    return mask_padded_vocab(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, vocab_size)


def megatron_cores(models) -> dict:
    """{self_attention module: megatron's DotProductAttention for it} over every layer of `models`."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    return {layer.self_attention: DotProductAttention(
        config=layer.self_attention.config, layer_number=layer.self_attention.layer_number,
        attn_mask_type=AttnMaskType.causal, attention_type="self", softmax_scale=layer.config.softmax_scale,
        pg_collection=layer.self_attention.pg_collection) for m in models for layer in m.decoder.layers}


@contextmanager
def before_issue18(lp):
    """megaslim's loop with megatron's own attention and RoPE in both models and the old fused KL."""
    from megatron.core.transformer import attention

    from megaslim.distill import losses

    saved = {attn: attn.core_attention for attn in lp.old_cores}
    kl, prep, rope = losses._ForwardKL, losses._prepare, attention.apply_rotary_pos_emb
    for attn, core in lp.old_cores.items():
        attn.core_attention = core
    losses._ForwardKL, losses._prepare = _OldForwardKL, _old_prepare
    attention.apply_rotary_pos_emb = getattr(rope, "original", rope)  # megatron's unfused RoPE (model/rope.py)
    try:
        yield
    finally:
        losses._ForwardKL, losses._prepare, attention.apply_rotary_pos_emb = kl, prep, rope
        for attn, core in saved.items():
            attn.core_attention = core


def _before(fn):
    def run():
        with before_issue18(_before.lp):
            return fn()
    return run


# -- the two loops ----------------------------------------------------------------------------------
def hand_kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL(teacher || student) per token, as a user writes it."""
    log_q = F.log_softmax(s_logits.float(), dim=-1)
    log_p = F.log_softmax(t_logits.float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum") / s_logits.shape[0] / s_logits.shape[1]


def hand_step(lp: Loops, *, with_teacher: bool, phases: dict | None = None) -> float:
    """One hand-written KD step (with_teacher=False: zero teacher logits, the student step alone)."""
    ph = phases if phases is not None else {}
    with _phase(ph, "teacher forward"), torch.no_grad():
        t_logits = lp.hf_teacher(input_ids=lp.tokens).logits if with_teacher else None
    with _phase(ph, "student forward"):
        s_logits = lp.hf_student(input_ids=lp.tokens).logits
    with _phase(ph, "loss"):
        loss = hand_kd_loss(s_logits, t_logits if t_logits is not None else torch.zeros_like(s_logits))
    with _phase(ph, "backward"):
        loss.backward()
    with _phase(ph, "optimizer (clip + AdamW + zero_grad)"):
        torch.nn.utils.clip_grad_norm_(lp.hf_student.parameters(), lp.cfg.train.clip_grad)
        lp.hf_opt.step()
        lp.hf_opt.zero_grad(set_to_none=True)
    return loss.item()


def megaslim_step(lp: Loops, *, with_teacher: bool) -> None:
    if with_teacher:
        lp.trainer.train_step(lp.batch)
        return
    saved = lp.trainer.model.teacher
    lp.trainer.model.teacher = lp.zero_teacher  # the same loss code, teacher logits free
    try:
        lp.trainer.train_step(lp.batch)
    finally:
        lp.trainer.model.teacher = saved


def steps(lp: Loops) -> dict:
    """{(loop, measurement): callable} for the six interleaved measurements."""
    b, s = lp.tokens.shape

    def m_teacher():
        run_forward(lp.teacher, lp.batch, lambda _b, _o: {}, seq_length=s, micro_batch_size=b)

    def h_teacher():
        with torch.no_grad():
            lp.hf_teacher(input_ids=lp.tokens)

    _before.lp = lp
    mine = {("megaslim", "teacher forward"): m_teacher,
            ("megaslim", "student step"): lambda: megaslim_step(lp, with_teacher=False),
            ("megaslim", "KD step"): lambda: megaslim_step(lp, with_teacher=True)}
    return {**mine, **{("before", k[1]): _before(fn) for k, fn in mine.items()},
            ("hand", "teacher forward"): h_teacher,
            ("hand", "student step"): lambda: hand_step(lp, with_teacher=False),
            ("hand", "KD step"): lambda: hand_step(lp, with_teacher=True)}


# -- measurement ------------------------------------------------------------------------------------
@contextmanager
def _phase(acc: dict, name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@dataclass
class RssPeak:
    """Samples this process's RSS every 2 ms in a thread: the peak during a region (max RSS only grows)."""
    peak: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self):
        self.base = _rss_mb()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def measure(lp: Loops, repeats: int) -> dict:
    """Median seconds per (loop, measurement), interleaved; order reversed every other round (drift)."""
    fns = steps(lp)
    for key, fn in fns.items():  # warm-up (allocator, optimizer state, first calls): a KD step covers the rest
        if key[1] == "KD step":
            fn()
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}  # process CPU seconds: less sensitive than wall time to other jobs' load
    peaks = dict.fromkeys(LOOPS, 0.0)
    bases = dict.fromkeys(LOOPS, 0.0)
    order = list(fns)
    for r in range(repeats):
        for key in (order if r % 2 == 0 else order[::-1]):
            with RssPeak() as rss:
                t0, c0 = time.perf_counter(), time.process_time()
                fns[key]()
                times[key].append(time.perf_counter() - t0)
                cpu[key].append(time.process_time() - c0)
            if key[1] == "KD step":
                peaks[key[0]] = max(peaks[key[0]], rss.peak)
                bases[key[0]] = max(bases[key[0]], rss.base)
    return {"median_s": {f"{k[0]}|{k[1]}": statistics.median(v) for k, v in times.items()},
            "all_s": {f"{k[0]}|{k[1]}": v for k, v in times.items()},
            "median_cpu_s": {f"{k[0]}|{k[1]}": statistics.median(v) for k, v in cpu.items()},
            "peak_rss_mb": peaks, "rss_before_mb": bases}


# -- profile ----------------------------------------------------------------------------------------
def _wrap(obj, name: str, acc: dict, label: str, undo: list) -> None:
    """Time obj.name(...) into acc[label] (an instance attribute shadowing the method; `undo` restores)."""
    fn = getattr(obj, name, None)
    if fn is None:
        return

    def timed(*a, **k):
        with _phase(acc, label):
            return fn(*a, **k)

    had = name in vars(obj)
    setattr(obj, name, timed)
    undo.append(lambda: setattr(obj, name, fn) if had else delattr(obj, name))


def megaslim_phases(lp: Loops) -> dict:
    """Seconds per phase of one megaslim KD step, from timers around its parts (the rest: schedule,
    DDP hooks outside backward, zero_grad, scheduler, metrics all-reduce)."""
    acc, undo = {}, []
    tr = lp.trainer
    _wrap(lp.teacher, "forward", acc, "teacher forward", undo)
    _wrap(tr.ddp.module, "forward", acc, "student forward", undo)
    _wrap(tr, "_loss_func", acc, "loss", undo)
    _wrap(tr.ddp.config, "finalize_model_grads_func", acc, "finalize_model_grads (DDP)", undo)
    for opt in getattr(tr.optimizer, "chained_optimizers", None) or [tr.optimizer]:  # the leaves: no double count
        _wrap(opt, "prepare_grads", acc, "optimizer: prepare_grads (main_grad -> grad)", undo)
        _wrap(opt, "clip_grad_norm", acc, "optimizer: grad norm + clip", undo)
        _wrap(opt, "step_with_ready_grads", acc, "optimizer: Adam step", undo)
    real_backward = torch.autograd.backward

    def backward(*a, **k):
        with _phase(acc, "backward (incl. DDP main_grad hooks)"):
            return real_backward(*a, **k)

    torch.autograd.backward = backward
    try:
        with _phase(acc, "total"):
            megaslim_step(lp, with_teacher=True)
    finally:
        torch.autograd.backward = real_backward
        for u in reversed(undo):
            u()
    return acc


def top_ops(fn, n: int = 12) -> list[tuple[str, float, int]]:
    """(op, self CPU ms, calls) of the n ops with the most self CPU time in one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in rows]


def profile_all(lp: Loops) -> dict:
    """Per-phase seconds and top ops of one KD step of each loop."""
    phases = {"megaslim": megaslim_phases(lp)}
    with before_issue18(lp):
        phases["before"] = megaslim_phases(lp)
    hand = {}
    with _phase(hand, "total"):
        hand_step(lp, with_teacher=True, phases=hand)
    phases["hand"] = hand
    kd = steps(lp)
    return {"phases": phases, "ops": {loop: top_ops(kd[(loop, "KD step")]) for loop in LOOPS}}


# -- one shape (a subprocess) and the report ---------------------------------------------------------
def run_one(args) -> dict:
    b, s = map(int, args.one.split("x"))
    lp = build_loops(b, s, args.core_attention)
    res = {"batch": b, "seq": s, "threads": torch.get_num_threads(), **measure(lp, args.repeats)}
    if args.one in args.profile.split(","):
        res["profile"] = profile_all(lp)
    return res


def paired_lines(results: list[dict]) -> list[str]:
    """Per-round KD-step ratios: the rounds are interleaved, so a noisy spell slows both loops of a round
    alike and the per-round ratio is steadier than the ratio of medians."""
    out = []
    for res in results:
        m, h = res["all_s"]["megaslim|KD step"], res["all_s"]["hand|KD step"]
        r = sorted(a / b for a, b in zip(m, h))
        out.append(f"{res['batch']} x {res['seq']}: megaslim / hand-written KD step per round, median "
                   f"**{statistics.median(r):.2f}x** (range {r[0]:.2f}-{r[-1]:.2f} over {len(r)} rounds); "
                   f"fastest step of each, {min(m) / min(h):.2f}x.")
    return out + [""] if out else out


NAMES = {"megaslim": "megaslim", "before": "megaslim before (megatron attention + RoPE, old KL)",
         "hand": "hand-written"}


def shape_rows(res: dict) -> list[str]:
    med, cpu = res["median_s"], res["median_cpu_s"]
    tokens = res["batch"] * res["seq"]
    shape = f"{res['batch']} x {res['seq']}"
    rows = []
    for loop in LOOPS:
        kd, st, te = (med[f"{loop}|{m}"] for m in ("KD step", "student step", "teacher forward"))
        peak, base = res["peak_rss_mb"][loop], res["rss_before_mb"][loop]
        rows.append(f"| {shape} | {NAMES[loop]} | {kd:.3f} | {tokens / kd:,.0f} | {st:.3f} | {te:.3f} | "
                    f"{kd / (st + te):.2f} | {peak:,.0f} (+{peak - base:,.0f}) | {cpu[f'{loop}|KD step']:.3f} |")
    hand, hand_cpu = med["hand|KD step"], cpu["hand|KD step"]
    for loop in ("megaslim", "before"):
        rows.append(f"| {shape} | **{NAMES[loop]} / hand-written** | **{med[f'{loop}|KD step'] / hand:.2f}x** "
                    f"| | | | | | **{cpu[f'{loop}|KD step'] / hand_cpu:.2f}x** |")
    return rows


def profile_lines(res: dict) -> list[str]:
    p = res.get("profile")
    if not p:
        return []
    lines = [f"### Breakdown of one KD step at {res['batch']} x {res['seq']} (profiled after the timing)", "",
             "| loop | phase | s |", "|---|---|---|"]
    for loop, ph in p["phases"].items():
        lines += [f"| {loop} | {k} | {v:.3f} |" for k, v in ph.items() if k != "total"]
        lines.append(f"| {loop} | **total** | **{ph['total']:.3f}** |")
    for loop, ops in p["ops"].items():
        lines += ["", f"Top ops by self CPU time, {loop} (torch.profiler, one KD step):", "",
                  "| op | self ms | calls |", "|---|---|---|", *[f"| `{k}` | {ms:.0f} | {c} |" for k, ms, c in ops]]
    return lines + [""]


def report(args, results: list[dict]) -> str:
    threads = results[0]["threads"] if results else torch.get_num_threads()
    lines = [SECTION, "",
             "Teacher SmolLM2-135M, student pruned to hidden 468 / ffn 750, forward KL (megaslim's default), AdamW "
             "(betas 0.9/0.95, wd 0.01), clip 1.0, fp32; the same weights and token batches in both loops. The hand "
             "loop is plain transformers (SDPA attention): teacher forward under `no_grad`, student forward/backward, "
             "`F.kl_div(..., log_target=True)`, `clip_grad_norm_`, `AdamW.step`. megaslim runs "
             f"`Trainer.train_step` with `model.core_attention={args.core_attention}`. "
             f"CPU, {threads} threads, a machine shared with other jobs: timings are noisy, so each shape runs "
             "the nine measurements interleaved in one process (order reversed every other round) and the ratios, "
             f"not the absolute seconds, are the result. Median of {args.repeats} rounds after a warm-up KD step "
             "of each loop. \"megaslim before\" is the same megaslim loop with megatron's DotProductAttention "
             "and unfused RoPE swapped back into both models and the fused KL as it was before issue 18 (its logits "
             "come from the hidden states like megaslim's: GPTModel's [s, b, V] -> [b, s, V] copies, also removed "
             "by issue 18, are not put back, so this row understates the change). "
             "KD step CPU s: the process's CPU time (all its threads) for the step, median; it counts work, not "
             "waiting for a core, so it moves less with the machine's load than the wall time.", "",
             "Student step = the same loop with the teacher replaced by free zero logits (same loss code). Peak RSS: "
             "the process's peak resident memory sampled during that loop's KD steps (both loops' models are loaded "
             "in the one process), in brackets the rise over the RSS at the step's start.", "",
             "| shape | loop | KD step (s) | tokens/s | student step (s) | teacher fwd (s) | KD / (student + teacher) "
             "| peak RSS MiB | KD step CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        lines += shape_rows(res)
    lines.append("")
    lines += paired_lines(results)
    for res in results:
        lines += profile_lines(res)
    lines += [f"Command: `python bench/kd_vs_hand.py --shapes {args.shapes} --repeats {args.repeats}"
              f" --profile '{args.profile}' --core-attention {args.core_attention}`", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)))
        return
    procs = []
    for shape in args.shapes.split(","):  # one process per shape: a clean heap and RSS for each
        cmd = [sys.executable, __file__, "--one", shape, "--repeats", str(args.repeats),
               "--core-attention", args.core_attention, "--profile", args.profile]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True))
        if not args.parallel:
            procs[-1].wait()
    results, failed = [], []
    for p in procs:  # a shape that dies (e.g. killed for memory) does not discard the others' results
        out, _ = p.communicate()
        if p.returncode:
            failed.append(f"{p.args[p.args.index('--one') + 1]} exited {p.returncode}")
            continue
        results.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
        print(out.splitlines()[-1], flush=True)
    if not results:
        raise SystemExit("error: every shape failed: " + "; ".join(failed))
    text = report(args, results)
    print(text)
    for f in failed:
        print(f"shape {f}", file=sys.stderr)
    replace_section(Path(args.out), SECTION, text)
    (Path(args.out).with_suffix(".json")).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

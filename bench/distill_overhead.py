"""Benchmark: one KD step vs (student train step + teacher forward alone) on the same batch, and the
peak memory of the KD job vs student training alone.

python bench/distill_overhead.py [--seq-length 256] [--micro-batch 4] [--repeats 3]
Student: SmolLM2-135M pruned in memory to the default width target (hidden 468, ffn 750);
teacher: SmolLM2-135M. Target: KD / (student step + teacher forward) <= 1.05. Writes docs/bench_distill.md.
"""
import argparse
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench_distill.md"))
    return ap.parse_args(argv)


@dataclass
class Setup:
    teacher: object
    trainer: object  # a KD Trainer of the pruned student
    batch: list  # one step's micro-batches
    mem0: float  # peak memory with both models loaded, before any step


def setup(args) -> Setup:
    """Teacher SmolLM2-135M, its student pruned in memory from uniform scores, a KD trainer, one batch."""
    cfg = load_config(None, [f"data.seq_length={args.seq_length}", f"train.micro_batch_size={args.micro_batch}",
                             f"train.global_batch_size={args.micro_batch}", "train.train_iters=100",
                             "train.warmup_iters=1", "output_dir=/tmp/megaslim_bench_distill"])
    init_runtime()
    source = resolve_source(None)
    teacher, arch, _ = load_model(cfg.model, source)
    rows = calibration_rows(None, load_tokenizer(cfg.model, source), num_samples=args.micro_batch,
                            seq_length=args.seq_length)
    # a plan from uniform scores: the shape, not the choice, sets the cost
    L = arch.num_layers
    flat = ImportanceScores(heads=torch.ones(L, 9), query_groups=torch.ones(L, 3), neurons=torch.ones(L, 1536),
                            channels=torch.ones(576), layer_bi=torch.ones(L))
    target = target_shape(arch, ExportConfigShape(hidden_size=468, ffn_hidden_size=750), tp=1, hf_export=False)
    student = student_from_plan(teacher, build_plan(arch, target, flat), cfg.model)  # in memory
    mem0 = peak_memory_mb()
    trainer = Trainer(cfg, Models(student, target, teacher, arch), tokenizer_dir=None, eval_rows=None)
    return Setup(teacher, trainer, make_microbatches(rows, args.micro_batch), mem0)


class _ZeroOutputLayer(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, hidden, weight=None):
        return torch.zeros(*hidden.shape[:2], self.vocab), None


class ZeroTeacher(torch.nn.Module):
    """Stands in for the teacher at no forward cost. megaslim's trainer asks the teacher for its final
    hidden states (post_process off) and runs its output layer inside the loss: both give zeros here."""

    def __init__(self, teacher):
        super().__init__()
        self.config = teacher.config
        self.vocab = teacher.embedding.word_embeddings.weight.shape[0]
        self.post_process = True
        self.share_embeddings_and_output_weights = False
        self.output_layer = _ZeroOutputLayer(self.vocab)

    def set_input_tensor(self, t):
        pass

    def forward(self, tokens, position_ids, attention_mask=None):
        b, s = tokens.shape
        if not self.post_process:
            return torch.zeros(s, b, self.config.hidden_size)
        return torch.zeros(b, s, self.vocab)


def measure(args, s: Setup) -> tuple[dict, float, float]:
    """(median seconds per measurement, peak MiB of student training alone, peak MiB of the KD job)."""
    def teacher_forward():
        run_forward(s.teacher, s.batch, lambda b, o: {}, seq_length=args.seq_length,
                    micro_batch_size=args.micro_batch)

    def kd_step():
        s.trainer.train_step(s.batch)

    # student alone: the same trainer and loss code, the teacher replaced by free zero logits
    zero_teacher = ZeroTeacher(s.teacher)

    def student_step():
        saved = s.trainer.model.teacher
        s.trainer.model.teacher = zero_teacher
        try:
            s.trainer.train_step(s.batch)
        finally:
            s.trainer.model.teacher = saved

    student_step()
    mem_student = peak_memory_mb()
    kd_step()
    mem_kd = peak_memory_mb()
    times = {"teacher forward": [], "student train step": [], "KD step": []}
    for _ in range(args.repeats):
        for name, fn in (("teacher forward", teacher_forward), ("student train step", student_step),
                         ("KD step", kd_step)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, mem_student - s.mem0, mem_kd - s.mem0


def report(args, med: dict, mem_student: float, mem_kd: float) -> str:
    """The markdown table of docs/bench_distill.md."""
    ratio = med["KD step"] / (med["student train step"] + med["teacher forward"])
    lines = [
        "# Distillation step overhead", "",
        f"Teacher SmolLM2-135M, student pruned to hidden 468 / ffn 750; batch {args.micro_batch} x "
        f"{args.seq_length} tokens; median of {args.repeats} alternating runs; "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}, {torch.get_num_threads()} threads.", "",
        "| measurement | value |", "|---|---|",
        *[f"| {k} (s) | {v:.3f} |" for k, v in med.items()],
        f"| KD step / (student step + teacher forward) | {ratio:.3f} |",
        f"| peak memory: student training alone (MiB) | {mem_student:.0f} over the loaded models |",
        f"| peak memory: KD job (MiB) | {mem_kd:.0f} over the loaded models |", "",
        "Target: ratio <= 1.05. The student-alone step runs the same loop with the teacher replaced by a "
        "stand-in that returns zero logits at no cost, so loss code and optimizer are identical. CPU peak "
        "memory is the process's max RSS (it only grows), so the KD figure includes the student run.", "",
        f"Command: `python bench/distill_overhead.py --seq-length {args.seq_length} --micro-batch "
        f"{args.micro_batch} --repeats {args.repeats}`", ""]
    return "\n".join(lines)


def replace_section(path: Path, heading: str, text: str, level: int | None = None) -> None:
    """Put `text` in place of the `heading` section of a markdown file (up to the next heading of level
    <= `level`, default the heading's own), or after the rest when absent; other sections stay."""
    level = level or len(heading) - len(heading.lstrip("#"))
    lines = path.read_text().splitlines() if path.exists() else []
    start = next((i for i, ln in enumerate(lines) if ln.strip() == heading), None)
    if start is None:
        kept, tail = lines, []
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")
                    and len(lines[i]) - len(lines[i].lstrip("#")) <= level), len(lines))
        kept, tail = lines[:start], lines[end:]
    while kept and not kept[-1].strip():
        kept.pop()
    body = "\n".join(kept + ([""] if kept else []) + [text.rstrip("\n"), ""] + ([*tail, ""] if tail else []))
    path.write_text(body.rstrip("\n") + "\n")


def main(argv=None):
    args = parse_args(argv)
    med, mem_student, mem_kd = measure(args, setup(args))
    text = report(args, med, mem_student, mem_kd)
    print(text)
    replace_section(Path(args.out), "# Distillation step overhead", text, level=2)


if __name__ == "__main__":
    main()

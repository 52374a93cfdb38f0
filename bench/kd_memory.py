"""Benchmark: peak memory of a KD step with whole vs chunked logits (distill.logit_chunk_tokens), on tiny
models with a large vocabulary, against the plain student step + the teacher's weights.

python bench/kd_memory.py [--seq 4096] [--vocab 128256] [--chunks 1024,256] [--rounds 2]
Teacher: a random Llama (hidden 128, 2 layers, tied embeddings), student: hidden 64, 2 layers, both with
the `--vocab` vocabulary, so the [tokens, vocab] logits are by far the largest tensors of a step. Every
memory figure comes from a fresh process running one optimizer step (forward KL, megaslim's default):
the RSS just before the step, and the peak RSS during it (sampled every 2 ms; on a GPU the CUDA
allocator's allocated and peak bytes instead), so figures do not depend on the machine's load. Step
times are measured side by side in one more process (whole and chunked steps alternating) and reported
as a ratio. Writes the "Chunked logit KD: memory" section of
docs/bench_distill.md.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.distill_overhead import replace_section  # noqa: E402
from bench.kd_vs_hand import RssPeak  # noqa: E402
from megaslim.config import load_config  # noqa: E402
from megaslim.distill.train import Models, Trainer  # noqa: E402
from megaslim.runtime import init_runtime  # noqa: E402
from megaslim.sources import load_model, resolve_source  # noqa: E402

SECTION = "## Chunked logit KD: memory"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=128256)  # Llama-3
    ap.add_argument("--chunks", default="1024,256", help="comma-separated distill.logit_chunk_tokens values")
    ap.add_argument("--rounds", type=int, default=2, help="timed whole/chunked step pairs after a warm-up")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: MODE:CHUNK, print one JSON line
    ap.add_argument("--dirs", help=argparse.SUPPRESS)  # internal: TEACHER_DIR,STUDENT_DIR
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_distill.md"))
    return ap.parse_args(argv)


# -- setup ------------------------------------------------------------------------------------------
def make_model(path: Path, *, hidden: int, ffn: int, vocab: int, seq: int, seed: int) -> Path:
    """A random HF Llama (2 layers, 4 heads in 2 groups, tied embeddings) saved at `path`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
                      tie_word_embeddings=True, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(path), safe_serialization=True)
    return path


def build_trainer(args, mode: str, chunk: int, teacher_dir: str, student_dir: str):
    """(trainer, one step's micro-batches, teacher weight MiB). mode: kd (forward KL) | student (LM only,
    no teacher in the process)."""
    over = [f"data.seq_length={args.seq}", f"train.micro_batch_size={args.batch}",
            f"train.global_batch_size={args.batch}", "train.train_iters=100", "train.warmup_iters=1",
            f"distill.logit_chunk_tokens={chunk}", "output_dir=/tmp/megaslim_bench_kd_memory"]
    if mode == "student":
        over += ["distill.kd_loss_scale=0", "distill.skip_lm_loss=false"]
    cfg = load_config(None, over)
    init_runtime(seed=cfg.train.seed)
    student, s_arch, _ = load_model(cfg.model, resolve_source(student_dir))
    teacher, t_arch, t_mib = None, s_arch, 0.0
    if mode == "kd":
        teacher, t_arch, _ = load_model(cfg.model, resolve_source(teacher_dir))
        t_mib = sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20
    trainer = Trainer(cfg, Models(student, s_arch, teacher, t_arch), tokenizer_dir=None, eval_rows=None)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, s_arch.vocab_size, (args.batch, args.seq), generator=g)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(args.batch, args.seq),
             "position_ids": torch.arange(args.seq).expand(args.batch, args.seq).contiguous()}
    return trainer, [batch], t_mib


# -- one process: memory of one step, or alternating step times ---------------------------------------
def memory_one(args, mode: str, chunk: int, dirs: list[str]) -> dict:
    trainer, batch, t_mib = build_trainer(args, mode, chunk, *dirs)
    cuda = torch.cuda.is_available()
    if cuda:  # on a GPU the allocator's counters are exact: they replace the RSS figures
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated() / 2**20
    with RssPeak() as rss:
        t0 = time.perf_counter()
        metrics = trainer.train_step(batch)
        seconds = time.perf_counter() - t0
    before, peak = (cuda_before, torch.cuda.max_memory_allocated() / 2**20) if cuda else (rss.base, rss.peak)
    return {"mode": mode, "chunk": chunk, "rss_before_mb": before, "peak_rss_mb": peak, "cuda": cuda,
            "teacher_weights_mb": t_mib, "loss": metrics["loss"], "seconds": seconds}


def _set_chunk(trainer, chunk: int) -> None:
    """Switch a KD trainer between whole (0) and chunked logits between steps (bench only)."""
    trainer.chunk_tokens = chunk


def timing_one(args, chunk: int, dirs: list[str]) -> dict:
    """Median KD step seconds, whole vs chunked, alternating in this one process (a warm-up each)."""
    trainer, batch, _ = build_trainer(args, "kd", 0, *dirs)
    times = {0: [], chunk: []}
    for r in range(args.rounds + 1):
        for c in ((0, chunk) if r % 2 == 0 else (chunk, 0)):
            _set_chunk(trainer, c)
            t0 = time.perf_counter()
            trainer.train_step(batch)
            if r:  # round 0 is the warm-up
                times[c].append(time.perf_counter() - t0)
    return {"mode": "timing", "chunk": chunk, "whole_s": statistics.median(times[0]),
            "chunked_s": statistics.median(times[chunk]), "all_s": {str(k): v for k, v in times.items()}}


def run_child(args, spec: str, dirs: str) -> dict:
    cmd = [sys.executable, __file__, "--one", spec, "--dirs", dirs, "--seq", str(args.seq), "--batch",
           str(args.batch), "--vocab", str(args.vocab), "--rounds", str(args.rounds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- report -----------------------------------------------------------------------------------------
def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def fitting_seq(args) -> int:
    """The largest seq <= --seq (halving) whose whole-logit KD step fits the memory free now: about five
    [tokens, vocab] float32 tensors at its peak (six counted), with a 2 GiB margin for the rest of the machine."""
    seq = args.seq
    while seq > 256 and 6 * args.batch * seq * args.vocab * 4 / 2**20 + 2048 > _mem_available_mb():
        seq //= 2
    return seq


def report(args, mem: list[dict], timing: list[dict], asked_seq: int) -> str:
    student = next(r for r in mem if r["mode"] == "student")
    t_mib = next(r["teacher_weights_mb"] for r in mem if r["mode"] == "kd")
    base = student["peak_rss_mb"] + t_mib
    tokens = args.batch * args.seq
    logits_mib = tokens * args.vocab * 4 / 2**20
    unit = "CUDA allocated" if student.get("cuda") else "RSS"
    lines = [SECTION, "",
             f"Tiny random Llamas with a {args.vocab:,}-token vocabulary"
             + (" (Llama-3's)" if args.vocab == 128256 else "") + ": teacher hidden 128, student "
             f"hidden 64, 2 layers each, tied embeddings; batch {args.batch} x {args.seq} tokens"
             + (f" (asked {asked_seq}; the largest that fitted the free memory)" if asked_seq != args.seq else "")
             + f"; one [tokens, vocab] float32 tensor is {logits_mib:,.0f} MiB. Forward KL (the default), fp32, "
             "CPU. Each row is a fresh process running one optimizer step: RSS just before the step (models, "
             "no optimizer state yet) and the peak RSS during it, sampled every 2 ms. Memory does not depend on "
             "the machine's load.", "",
             f"| step | logits | {unit} before step MiB | peak {unit} MiB | rise MiB "
             "| peak / (student step + teacher weights) |",
             "|---|---|---|---|---|---|",
             f"| student alone (LM loss, no teacher) | whole | {student['rss_before_mb']:,.0f} | "
             f"{student['peak_rss_mb']:,.0f} | {student['peak_rss_mb'] - student['rss_before_mb']:,.0f} | |",
             f"| student step + teacher weights ({t_mib:,.0f} MiB) | | | {base:,.0f} | | 1.00 |"]
    for r in (r for r in mem if r["mode"] == "kd"):
        what = "whole" if not r["chunk"] else f"chunks of {r['chunk']} tokens"
        lines.append(f"| KD | {what} | {r['rss_before_mb']:,.0f} | {r['peak_rss_mb']:,.0f} | "
                     f"{r['peak_rss_mb'] - r['rss_before_mb']:,.0f} | {r['peak_rss_mb'] / base:.2f} |")
    lines += ["", "Step time, whole vs chunked logits, measured side by side in one process (alternating, "
              f"median of {args.rounds} after a warm-up of each), on a shared 2-core machine under other jobs' "
              "load: read the ratio, not the seconds.", "",
              "| chunk tokens | whole s | chunked s | chunked / whole |", "|---|---|---|---|"]
    for t in timing:
        lines.append(f"| {t['chunk']} | {t['whole_s']:.2f} | {t['chunked_s']:.2f} | "
                     f"{t['chunked_s'] / t['whole_s']:.2f} |")
    cmd = f"python bench/kd_memory.py --seq {asked_seq} --vocab {args.vocab} --chunks {args.chunks}"
    return "\n".join(lines + ["", f"Command: `{cmd}`", ""])


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        mode, chunk = args.one.split(":")
        dirs = args.dirs.split(",")
        res = timing_one(args, int(chunk), dirs) if mode == "timing" else memory_one(args, mode, int(chunk), dirs)
        print(json.dumps(res), flush=True)
        return
    asked, args.seq = args.seq, fitting_seq(args)
    chunks = [int(c) for c in args.chunks.split(",") if c]
    with tempfile.TemporaryDirectory() as tmp:
        t_dir = make_model(Path(tmp) / "teacher", hidden=128, ffn=256, vocab=args.vocab, seq=args.seq, seed=0)
        s_dir = make_model(Path(tmp) / "student", hidden=64, ffn=128, vocab=args.vocab, seq=args.seq, seed=1)
        dirs = f"{t_dir},{s_dir}"
        mem = [run_child(args, spec, dirs) for spec in ["student:0", "kd:0", *(f"kd:{c}" for c in chunks)]]
        timing = [run_child(args, f"timing:{chunks[0]}", dirs)] if chunks and args.rounds else []
    for r in mem + timing:
        print(json.dumps(r))
    text = report(args, mem, timing, asked)
    print(text)
    replace_section(Path(args.out), SECTION, text)


if __name__ == "__main__":
    main()

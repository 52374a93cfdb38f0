"""Benchmark row: distillation tokens/s with FP8 (Transformer Engine, distill.fp8=hybrid) vs BF16.

python bench/fp8_throughput.py [--model HF_DIR|.gguf] [--steps 30] [--seq-length 1024] [--micro-batch 8]
    [--global-batch 32] [--nproc 1] [--recipe delayed] [--work DIR] [--out docs/bench_fp8.md]
Needs CUDA, Transformer Engine and a GPU with compute capability >= 8.9 (an NGC PyTorch container).
Steps: (1) launch/prune.py makes the student once (teacher = --model, default the embedded
SmolLM2-135M; ffn 1536 -> 1024, 30 -> 24 layers) and exports it as an HF directory; (2) launch/distill.py
runs --steps steps twice with the TE layer spec and BF16 params, without and with distill.fp8=hybrid;
(3) the median tokens/s after the first 5 steps and the mean KD loss of each run go into a table
appended to --out. Small models (hidden 576) gain little or nothing from FP8: its cast and amax
overheads only pay off on large GEMMs; use --model with a larger teacher to see the speedup.
Status: written for the lent-GPU / cluster path and NOT run in this repository's CI (no GPU, no TE).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: str, args: list[str], nproc: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", str(ROOT / script), *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def run_stats(out: Path, skip: int) -> dict:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "tokens_per_s" in r]
    if len(steps) <= skip:
        raise SystemExit(f"{out}: only {len(steps)} steps; run more than {skip}")
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[skip:]),
            "kd_loss": statistics.fmean(r["kd_loss"] for r in steps), "steps": len(steps)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="teacher (HF dir | .gguf); default: embedded SmolLM2-135M")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--recipe", default="delayed", help="distill.fp8_recipe (once the schema has the key)")
    ap.add_argument("--prune", nargs="*", default=["prune.export_config.ffn_hidden_size=1024",
                                                   "prune.export_config.num_layers=24"])
    ap.add_argument("--work", default="/tmp/megaslim_bench_fp8")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_fp8.md"))
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/fp8_throughput.py needs a CUDA GPU (with FP8: compute capability >= 8.9)")
    work = Path(args.work)
    model = [f"model.load={args.model}"] if args.model else []
    student = work / "student_hf"
    if not (student / "config.json").is_file():
        torchrun("launch/prune.py", [*model, f"output_dir={work / 'prune'}", f"export.hf_dir={student}",
                                     "importance.num_samples=64", "data.seq_length=512", "eval.num_samples=8",
                                     *args.prune], args.nproc)
    common = [*model, f"distill.student.load={student}", "model.transformer_impl=transformer_engine",
              "model.params_dtype=bfloat16", f"data.seq_length={args.seq_length}",
              f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.global_batch}",
              f"train.train_iters={args.steps}", "train.warmup_iters=2", "eval.num_samples=8",
              f"data.micro_batch_size={args.micro_batch}", f"parallel.tensor_model_parallel_size={args.nproc}"]
    stats = {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name, extra in (("bf16", []), ("fp8", ["distill.fp8=hybrid"]
                                       + ([f"distill.fp8_recipe={args.recipe}"] if args.recipe != "delayed" else []))):
        out = work / f"{name}-{stamp}"
        torchrun("launch/distill.py", [*common, f"output_dir={out}", *extra], args.nproc)
        stats[name] = run_stats(out, skip=5)
    speedup = stats["fp8"]["tokens_per_s"] / stats["bf16"]["tokens_per_s"]
    device = torch.cuda.get_device_name()
    header = ("| date | device | teacher | TP | seq x mbs (gbs) | BF16 tok/s | FP8 tok/s | FP8 / BF16 | "
              "mean KD loss BF16 / FP8 |\n|---|---|---|---|---|---|---|---|---|\n")
    row = (f"| {time.strftime('%Y-%m-%d')} | {device} | {args.model or 'SmolLM2-135M'} | {args.nproc} | "
           f"{args.seq_length} x {args.micro_batch} ({args.global_batch}) | {stats['bf16']['tokens_per_s']:.0f} | "
           f"{stats['fp8']['tokens_per_s']:.0f} | {speedup:.2f} | {stats['bf16']['kd_loss']:.4f} / "
           f"{stats['fp8']['kd_loss']:.4f} |\n")
    out_md = Path(args.out)
    if not out_md.exists():
        out_md.write_text("# FP8 vs BF16 distillation throughput\n\nRows appended by `bench/fp8_throughput.py` "
                          "(median tokens/s after 5 warm-up steps; recipe "
                          f"{args.recipe}, hybrid format).\n\n" + header)
    with open(out_md, "a") as f:
        f.write(row)
    print(header + row, end="")


if __name__ == "__main__":
    main()

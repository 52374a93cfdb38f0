"""Benchmark: cost of the importance hooks vs a plain forward over the same calibration samples.

python bench/importance_overhead.py [--samples 16] [--seq-length 256] [--repeats 3]
Runs both passes alternately in one process (machines are noisy: compare within one run) and writes
the table to docs/bench_importance.md. Target: hooks / plain <= 1.10 (the layer `loss` metric is extra
passes by definition and excluded).
"""
import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from megaslim.config import ImportanceConfig, ModelConfig
from megaslim.data.calibration import calibration_rows
from megaslim.importance.calibrate import activation_scores
from megaslim.io import atomic_write_text
from megaslim.model.forward import make_microbatches, run_forward
from megaslim.runtime import init_runtime
from megaslim.sources import load_model, resolve_source
from megaslim.tokenizer import load_tokenizer

PASSES = ("plain forward", "forward + importance hooks")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench_importance.md"))
    return ap.parse_args(argv)


def measure(args) -> dict[str, list[float]]:
    """Seconds of each pass over the same rows on SmolLM2-135M, `repeats` times, alternating."""
    init_runtime()
    cfg = ModelConfig()
    source = resolve_source(None)
    model, arch, _ = load_model(cfg, source)
    rows = calibration_rows(None, load_tokenizer(cfg, source), num_samples=args.samples,
                            seq_length=args.seq_length)
    imp = ImportanceConfig(num_samples=args.samples)

    def plain():
        run_forward(model, make_microbatches(rows, args.micro_batch), lambda b, o: {},
                    seq_length=args.seq_length, micro_batch_size=args.micro_batch)

    def hooked():
        activation_scores(model, arch, rows, imp, micro_batch_size=args.micro_batch)

    plain()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in PASSES}
    for _ in range(args.repeats):
        for name, fn in zip(PASSES, (plain, hooked)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def render(args, times: dict[str, list[float]]) -> str:
    """docs/bench_importance.md: median seconds, tokens/s and the ratio to the plain forward."""
    base = statistics.median(times[PASSES[0]])
    tokens = args.samples * args.seq_length
    lines = [
        "# Importance hooks overhead",
        "",
        f"SmolLM2-135M, {args.samples} samples x {args.seq_length} tokens, micro-batch {args.micro_batch}, "
        f"median of {args.repeats} alternating runs; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}.",
        "",
        "| pass | median s | tokens/s | ratio vs plain |",
        "|---|---|---|---|",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.2f} | {tokens / med:.0f} | {med / base:.3f} |")
    lines += ["", "Target: ratio <= 1.10. Command: `python bench/importance_overhead.py "
              f"--samples {args.samples} --seq-length {args.seq_length} --repeats {args.repeats}`", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    text = render(args, measure(args))
    print(text)
    atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()

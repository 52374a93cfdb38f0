"""Benchmark: cost of the importance hooks vs a plain forward over the same calibration samples.

python bench/importance_overhead.py [--samples 16] [--seq-length 256] [--repeats 3]
Runs both passes alternately in one process (machines are noisy: compare within one run) and writes
the table to docs/bench_importance.md. Target: hooks / plain <= 1.10 (the layer `loss` metric is extra
passes by definition and excluded).
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench_importance.md"))
    args = ap.parse_args()

    import torch

    from megaslim.config import ImportanceConfig, ModelConfig
    from megaslim.data.calibration import calibration_rows
    from megaslim.importance.calibrate import activation_scores
    from megaslim.model.forward import make_microbatches, run_forward
    from megaslim.runtime import init_runtime
    from megaslim.sources import load_model, resolve_source
    from megaslim.tokenizer import load_tokenizer

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
    times = {"plain forward": [], "forward + importance hooks": []}
    for _ in range(args.repeats):
        for name, fn in (("plain forward", plain), ("forward + importance hooks", hooked)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain forward"])
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
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()

"""Benchmark row: a 2:4-sparse linear (torch.sparse.to_sparse_semi_structured) vs dense, on a GPU.

python bench/sparse_matmul.py [--tokens 4096] [--dtype float16] [--iters 50] [--out docs/bench_sparse.md]
The weights are the decoder linears of SmolLM2-135M and Llama-3.1-8B (out x in), made 2:4 sparse along
the input dimension exactly as `prune.sparsity.pattern=2:4` does (megaslim.sparsity.masks); each is
timed as `x @ W.T` for x = [tokens, in] with CUDA events, dense then semi-structured, in one process, and
the outputs are compared. Needs CUDA and an Ampere-or-newer GPU (semi-structured kernels); elsewhere it
says so and exits 0 without writing anything.
Status: written for the lent-GPU / cluster path; NOT run in this repository (no GPU was lent).
"""
import argparse
import sys
from pathlib import Path

import torch

from megaslim.io import atomic_write_text
from megaslim.sparsity.masks import nm_mask

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {  # name: (out_features, in_features) of W
    "SmolLM2 linear_fc1 (gate+up)": (2 * 1536, 576),
    "SmolLM2 linear_fc2": (576, 1536),
    "Llama-3.1-8B linear_qkv": (4096 + 2 * 1024, 4096),
    "Llama-3.1-8B linear_fc1 (gate+up)": (2 * 14336, 4096),
    "Llama-3.1-8B linear_fc2": (4096, 14336),
}


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """`weight` with the smallest 2 of every 4 inputs zeroed, as prune.sparsity.pattern=2:4 does."""
    return weight * nm_mask(weight.abs().float(), 2, 4).to(weight.dtype)


def time_ms(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def row(name: str, out_f: int, in_f: int, tokens: int, dtype: torch.dtype, iters: int) -> str:
    """One table row: dense and 2:4 `x @ W.T` times for a random [out_f, in_f] weight, and their output gap."""
    from torch.sparse import to_sparse_semi_structured  # CUDA-only path: after the device check

    w = two_four(torch.randn(out_f, in_f, device="cuda", dtype=dtype))
    x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
    ws = to_sparse_semi_structured(w)
    dense = time_ms(lambda: torch.nn.functional.linear(x, w), iters)
    sparse = time_ms(lambda: torch.nn.functional.linear(x, ws), iters)
    diff = (torch.nn.functional.linear(x, w) - torch.nn.functional.linear(x, ws)).abs().max().item()
    return f"| {name} ({out_f} x {in_f}) | {dense:.3f} | {sparse:.3f} | {dense / sparse:.2f}x | {diff:.2e} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_sparse.md"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        print("bench/sparse_matmul.py needs a CUDA GPU with compute capability >= 8.0 (2:4 semi-structured "
              "kernels); nothing measured.")
        return 0
    dtype = getattr(torch, args.dtype)
    lines = [f"# 2:4 semi-structured vs dense linear ({torch.cuda.get_device_name()}, {args.dtype}, "
             f"{args.tokens} tokens)", "", "| weight (out x in) | dense ms | 2:4 ms | speedup | max abs diff |",
             "|---|---|---|---|---|"]
    lines += [row(name, out_f, in_f, args.tokens, dtype, args.iters) for name, (out_f, in_f) in SHAPES.items()]
    lines += ["", f"Command: `python bench/sparse_matmul.py --tokens {args.tokens} --dtype {args.dtype}`", ""]
    text = "\n".join(lines)
    print(text)
    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sequence then batch aggregation of activation magnitudes, as sufficient statistics.

Each sample's per-token magnitudes are first reduced over its sequence (`seq_agg`); the per-sample
values are kept only as (count, sum, sum of squares), which add up across micro-batches, steps and
data-parallel ranks, so the final `batch_agg` does not depend on how the samples were split.
"""
from __future__ import annotations

import torch

AGGS = ("mean", "l2", "var")


def seq_reduce(act: torch.Tensor, seq_agg: str) -> torch.Tensor:
    """[s, b, n] activations -> [b, n] per-sample values of their magnitudes |a| (float64).

    The reduction runs in the activation's precision (fp32 or wider) and is widened afterwards;
    elementwise abs/square then a sum over dim 0 is ~4x faster on CPU than vector_norm over dim 0."""
    act = act if act.dtype in (torch.float32, torch.float64) else act.float()
    if seq_agg == "mean":
        return act.abs().mean(0).double()
    if seq_agg == "l2":
        return act.pow(2).sum(0).sqrt().double()
    if seq_agg == "var":
        return act.abs().var(0, unbiased=False).double()
    raise ValueError(f"unknown seq_agg {seq_agg!r}; choose from {AGGS}")


class SampleStats:
    """count / sum / sum-of-squares over samples of a per-sample [n] vector."""

    def __init__(self, n: int):
        self.count = torch.zeros((), dtype=torch.float64)
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.sumsq = torch.zeros(n, dtype=torch.float64)

    def add(self, values: torch.Tensor) -> None:
        """values: [b, n] per-sample values."""
        values = values.detach().double().cpu()
        self.count += values.shape[0]
        self.sum += values.sum(0)
        self.sumsq += values.pow(2).sum(0)

    def packed(self) -> torch.Tensor:
        """[n, 3] (count broadcast, sum, sumsq): one tensor to reduce across ranks."""
        return torch.stack([self.count.expand_as(self.sum), self.sum, self.sumsq], 1)

    @staticmethod
    def finalize(packed: torch.Tensor, batch_agg: str) -> torch.Tensor:
        count, s, sq = packed[..., 0], packed[..., 1], packed[..., 2]
        if batch_agg == "l2":
            return sq.sqrt()
        if batch_agg == "mean":
            return s / count
        if batch_agg == "var":
            mean = s / count
            return (sq / count - mean.pow(2)).clamp_min(0)
        raise ValueError(f"unknown batch_agg {batch_agg!r}; choose from {AGGS}")

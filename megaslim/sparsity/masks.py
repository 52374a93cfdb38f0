"""Scores -> keep-masks (True = kept weight) for unstructured and N:M sparsity, on full logical matrices.

Comparison groups (which weights compete for survival):
- `row`: each output row keeps the (1 - ratio) highest-scoring of its inputs (Wanda, arXiv 2306.11695:
  per-output comparison is what makes Wanda work on LLMs);
- `layer`: the whole matrix competes (magnitude pruning as in Han et al. 2015 and the Wanda paper's
  magnitude baseline, whose reference code thresholds the flattened layer);
- N:M (`2:4`): every N-of-M group of consecutive weights along the INPUT dimension keeps its N highest
  scores (the layout sparse tensor cores accelerate).
Ties are broken by position (stable sort), so the mask is a pure function of the score matrix.
The number of zeros is floor(ratio * group size) in every group.
"""
from __future__ import annotations

import torch

from megaslim.errors import MegaslimError


def unstructured_mask(scores: torch.Tensor, ratio: float, *, group: str) -> torch.Tensor:
    """Keep-mask of a 2-D score matrix [out, in] dropping `ratio` of each group (`row` | `layer`)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got {tuple(scores.shape)}")
    if not 0.0 < ratio < 1.0:
        raise MegaslimError(f"sparsity ratio {ratio} must be in (0, 1)")
    if group == "row":
        k = int(scores.shape[1] * ratio)
        order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask = torch.ones_like(scores, dtype=torch.bool)
        mask.scatter_(1, order, False)
        return mask
    if group == "layer":
        flat = scores.reshape(-1)
        k = int(flat.numel() * ratio)
        order = torch.sort(flat, stable=True).indices[:k]
        mask = torch.ones_like(flat, dtype=torch.bool)
        mask[order] = False
        return mask.view_as(scores)
    raise ValueError(f"unknown comparison group {group!r} (row | layer)")


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep-mask keeping the `n` highest scores of every `m` consecutive inputs of each row."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise MegaslimError(f"{n}:{m} sparsity needs an input dimension divisible by {m}, got {in_f}")
    groups = scores.reshape(out_f, in_f // m, m)
    drop = torch.sort(groups, dim=2, stable=True).indices[..., : m - n]
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, drop, False)
    return mask.view(out_f, in_f)


def comparison_group(method: str) -> str:
    """`row` for Wanda (per output), `layer` for magnitude (see the module docstring)."""
    return "row" if method == "wanda" else "layer"


def make_mask(scores: torch.Tensor, *, method: str, ratio: float, pattern: str) -> torch.Tensor:
    if pattern == "2:4":
        return nm_mask(scores, 2, 4)
    if pattern != "unstructured":
        raise MegaslimError(f"unknown sparsity pattern {pattern!r} (unstructured | 2:4)")
    return unstructured_mask(scores, ratio, group=comparison_group(method))


def scores_for(weight: torch.Tensor, method: str, in_norms: torch.Tensor | None = None) -> torch.Tensor:
    """|W| (magnitude) or |W| * ||X_j||_2 (wanda; `in_norms` [in]) in float64."""
    s = weight.detach().abs().double()
    if method == "wanda":
        if in_norms is None:
            raise MegaslimError("wanda scores need the input activation norms of every linear")
        return s * in_norms.to(device=s.device, dtype=torch.float64).unsqueeze(0)
    if method == "magnitude":
        return s
    raise MegaslimError(f"unknown sparsity method {method!r} (magnitude | wanda)")

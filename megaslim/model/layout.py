"""The one table of how each megatron GPT parameter is laid out across tensor-parallel ranks.

Everything that moves weights between layouts (HF import/export, checkpoint resharding, pruning) goes
through `shard` / `unshard` here, so TP knowledge lives in one place. A "full" tensor is the logical
TP=1 megatron tensor (vocab rows unpadded); a "shard" is what one TP rank holds.
"""
from __future__ import annotations

import re
from enum import Enum

import torch


class Layout(Enum):
    REPLICATED = "replicated"  # norms (weights and biases): every TP rank holds all of it
    COLUMN = "column"  # split along dim 0 (linear_qkv: whole query groups per rank; non-gated linear_fc1)
    ROW = "row"  # split along dim 1 (linear_proj, linear_fc2 inputs)
    GATED = "gated"  # SwiGLU linear_fc1: full = [gate; up], each shard = [gate_r; up_r]
    VOCAB = "vocab"  # embedding / output layer: rows padded to the padded vocab, then COLUMN


_RULES: list[tuple[str, Layout]] = [
    (r"embedding\.word_embeddings\.weight$", Layout.VOCAB),
    (r"output_layer\.weight$", Layout.VOCAB),
    (r"self_attention\.linear_qkv\.(weight|bias)$", Layout.COLUMN),
    (r"self_attention\.linear_proj\.weight$", Layout.ROW),
    (r"mlp\.linear_fc1\.weight$", Layout.GATED),  # COLUMN when the MLP is not gated (see layout_of)
    (r"mlp\.linear_fc2\.weight$", Layout.ROW),
    # MoE: each routed expert (split over TP like a dense MLP; whole experts over EP ranks, see
    # megaslim.model.experts) and the shared expert; the router and the shared expert's gate are replicated
    (r"mlp\.(experts\.local_experts\.\d+|shared_experts)\.linear_fc1\.weight$", Layout.GATED),
    (r"mlp\.(experts\.local_experts\.\d+|shared_experts)\.linear_fc2\.weight$", Layout.ROW),
    (r"mlp\.router\.(weight|expert_bias)$|mlp\.shared_experts\.gate_weight$", Layout.REPLICATED),
    # norms (RMSNorm weight; LayerNorm weight and bias), incl. TE's fused layer_norm_weight/_bias
    (r"(layernorm|layer_norm)[_.]?(weight|bias)$|norm\.(weight|bias)$", Layout.REPLICATED),
]


def layout_of(name: str, *, gated: bool = True) -> Layout:
    """How parameter `name` is split over TP ranks. `gated`: whether the model's MLP is gated (SwiGLU,
    `config.gated_linear_unit`); a non-gated linear_fc1 (Nemotron's squared-ReLU up projection) is COLUMN."""
    for pattern, layout in _RULES:
        if re.search(pattern, name):
            return Layout.COLUMN if layout is Layout.GATED and not gated else layout
    raise KeyError(f"no tensor-parallel layout rule for parameter {name!r}")


def shard(full: torch.Tensor, layout: Layout, tp_rank: int, tp: int,
          padded_rows: int | None = None) -> torch.Tensor:
    """The slice of `full` that TP rank `tp_rank` of `tp` holds."""
    if layout is Layout.REPLICATED:
        return full
    if layout is Layout.VOCAB:
        rows = padded_rows if padded_rows is not None else full.shape[0]
        if rows > full.shape[0]:
            pad = full.new_zeros((rows - full.shape[0], *full.shape[1:]))
            full = torch.cat([full, pad], 0)
        return full.chunk(tp, 0)[tp_rank]
    if layout is Layout.COLUMN:
        return full.chunk(tp, 0)[tp_rank]
    if layout is Layout.ROW:
        return full.chunk(tp, 1)[tp_rank]
    if layout is Layout.GATED:
        gate, up = full.chunk(2, 0)
        return torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]], 0)
    raise ValueError(layout)


def unshard(shards: list[torch.Tensor], layout: Layout, vocab_size: int | None = None) -> torch.Tensor:
    """Inverse of `shard`: the full logical tensor from all TP ranks' shards (in rank order)."""
    if layout is Layout.REPLICATED:
        return shards[0]
    if layout is Layout.VOCAB:
        full = torch.cat(shards, 0)
        return full[:vocab_size] if vocab_size is not None else full
    if layout is Layout.COLUMN:
        return torch.cat(shards, 0)
    if layout is Layout.ROW:
        return torch.cat(shards, 1)
    if layout is Layout.GATED:
        halves = [s.chunk(2, 0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
    raise ValueError(layout)

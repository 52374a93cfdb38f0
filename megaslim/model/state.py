"""Move full logical weights in and out of this rank's GPTModel shard (any TP/PP).

Parameter names are made global: `decoder.layers.{i}` uses the layer's global index, so a name means
the same tensor at every pipeline layout.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

from megaslim.model.layout import Layout, layout_of, shard, unshard
from megaslim.runtime.layout import ParallelLayout

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _layer_offset(model) -> int:
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def global_name(model, local_name: str) -> str:
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    return f"decoder.layers.{int(m.group(1)) + _layer_offset(model)}." + local_name[m.end():]


def named_params(model) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) for every parameter this rank holds."""
    for name, p in model.named_parameters():
        yield global_name(model, name), p


@torch.no_grad()
def load_full_state(model, fetch: Callable[[str], torch.Tensor]) -> None:
    """Fill every parameter of this rank from `fetch(global_name) -> full logical tensor`."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    gated = model.config.gated_linear_unit  # a non-gated fc1 is a plain column split
    for name, param in named_params(model):
        full = fetch(name)
        piece = shard(full, layout_of(name, gated=gated), tp_rank, tp, padded_rows=param.shape[0] * tp)
        if piece.shape != param.shape:
            raise ValueError(f"{name}: source gives {tuple(piece.shape)}, model expects {tuple(param.shape)}")
        param.copy_(piece.to(param.dtype))


@torch.no_grad()
def gather_full_state(model, vocab_size: int) -> dict[str, torch.Tensor]:
    """Full logical tensors of this pipeline stage (all-gathered over TP), keyed by global name."""
    out = {}
    gated = model.config.gated_linear_unit
    for name, param in named_params(model):
        layout = layout_of(name, gated=gated)
        local = param.detach().contiguous()
        parts = [local] if layout is Layout.REPLICATED else ParallelLayout.tp_gather_parts(local)
        # kept in the parameter's dtype at every TP size; clone: a replicated tensor must not alias
        out[name] = unshard([p.cpu() for p in parts], layout, vocab_size=vocab_size).clone()
    return out

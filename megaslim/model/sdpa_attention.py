"""Core attention through torch's scaled_dot_product_attention, for megatron's local layer spec.

megatron's local `DotProductAttention` materialises [b, n, s, s] scores with baddbmm + a separate
softmax + dropout; SDPA fuses them (flash / memory-efficient kernels on GPU, a fused math path on
CPU). It plugs in as `submodules.core_attention` of the self-attention spec; megatron-core is not
edited. Same interface and numerics as `DotProductAttention` (causal masks only, GQA).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class SDPAttention(MegatronModule):
    """Causal self-attention core: q, k, v [s, b, heads, head_dim] -> context [s, b, heads * head_dim]."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("model.core_attention=sdpa does not support context parallelism")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("model.core_attention=sdpa does not support sliding-window attention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"model.core_attention=sdpa supports softmax_type=vanilla only, "
                             f"not {config.softmax_type}")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"model.core_attention=sdpa needs a causal mask, got {attn_mask_type}")
        tp = (pg_collection.tp.size() if getattr(pg_collection, "tp", None) is not None
              else parallel_state.get_tensor_model_parallel_world_size())
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        head_dim = config.kv_channels
        scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        # query-key layer scaling divides the scores by layer_number and the softmax multiplies it back
        # in megatron's fused softmax: a no-op on the probabilities, so the plain scale is exact.
        self.softmax_scale = scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.hidden_per_partition = head_dim * self.heads

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("model.core_attention=sdpa supports neither packed sequences nor attention bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, head_dim]
        rep = self.heads // self.groups
        kwargs = {}
        if rep > 1 and _HAS_GQA:
            kwargs["enable_gqa"] = True
        elif rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        p = self.dropout_p if self.training else 0.0
        if p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                     scale=self.softmax_scale, **kwargs)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale, **kwargs)
        s, b = query.shape[0], query.shape[1]
        return ctx.permute(2, 0, 1, 3).reshape(s, b, self.hidden_per_partition)


def with_sdpa(spec):
    """`spec` (a layer ModuleSpec, or a block spec's TransformerBlockSubmodules) with every
    self-attention's core attention replaced by SDPAttention."""
    from dataclasses import replace

    if hasattr(spec, "layer_specs"):  # TransformerBlockSubmodules
        return replace(spec, layer_specs=[with_sdpa(s) for s in spec.layer_specs])
    attn = spec.submodules.self_attention
    attn = replace(attn, submodules=replace(attn.submodules, core_attention=SDPAttention))
    return replace(spec, submodules=replace(spec.submodules, self_attention=attn))

"""Core attention through torch's scaled_dot_product_attention, for megatron's local layer spec.

megatron's local `DotProductAttention` materialises [b, n, s, s] scores with baddbmm, then a separate
masked softmax and dropout; SDPA fuses them (flash / memory-efficient kernels on GPU, a fused flash
kernel on CPU). It plugs in as `submodules.core_attention` of the self-attention spec; megatron-core is
not edited. Same interface and masking as `DotProductAttention`: causal at prefill/training (sq == sk),
no mask for a one-token decode step (sq == 1, KV cache), an explicit boolean mask (True = masked out)
when one is passed; GQA by SDPA's enable_gqa on CPU, by repeating key/value groups (as megatron does) on GPU.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

# SDPA's enable_gqa argument exists from torch 2.5 (megaslim supports torch >= 2.4)
_GQA_IN_SDPA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _check_config(config, attn_mask_type: AttnMaskType, dropout: float) -> None:
    """Refuse, by name, what DotProductAttention does and this module does not."""
    if config.context_parallel_size != 1:
        raise ValueError("model.core_attention=sdpa does not support context parallelism")
    if getattr(config, "window_size", None) is not None:
        raise ValueError("model.core_attention=sdpa does not support sliding-window attention")
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        raise ValueError(f"model.core_attention=sdpa supports softmax_type=vanilla only, not {config.softmax_type}")
    if getattr(config, "qk_clip", False):
        raise ValueError("model.core_attention=sdpa does not track max attention logits (qk_clip)")
    if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
        raise ValueError(f"model.core_attention=sdpa needs a causal mask, got {attn_mask_type}")
    if dropout > 0:
        # megatron drops probabilities under its CUDA RNG tracker; SDPA's dropout draws differently, so a
        # dropout run would not match model.core_attention=local. megaslim trains with attention_dropout=0.
        raise ValueError(f"model.core_attention=sdpa runs without attention dropout (got {dropout}); "
                         "use model.core_attention=local")


class SDPAttention(MegatronModule):
    """Causal self-attention core: q [sq, b, heads, d], k/v [sk, b, groups, d] -> [sq, b, heads * d]."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        _check_config(config, attn_mask_type, dropout)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        head_dim = divide(config.kv_channels * config.num_attention_heads, config.num_attention_heads)
        # apply_query_key_layer_scaling divides megatron's scale by layer_number and its softmax multiplies
        # the scores by it again: the product is this plain scale.
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.hidden_per_partition = head_dim * self.heads

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        # attn_mask_type is not used, as in DotProductAttention: the constructor's type decides
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("model.core_attention=sdpa supports neither packed sequences nor attention bias")
        rep = self.heads // self.groups
        # GQA: on CPU the fused kernel reads each key/value group for its heads (enable_gqa; no repeated
        # copies, and no sum over them in backward). On GPU enable_gqa rules out the memory-efficient and
        # cuDNN kernels (fp32 would fall back to the math one), so megatron's own expansion stays there.
        gqa = rep > 1 and _GQA_IN_SDPA and query.device.type == "cpu"
        if rep > 1 and not gqa:
            key, value = key.repeat_interleave(rep, dim=2), value.repeat_interleave(rep, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        sq, sk = q.shape[2], k.shape[2]
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask.bool()  # megatron: True = masked out; SDPA: True = attend
        elif sq > 1:  # sq == 1: a decode step against the KV cache attends to everything, as megatron does
            if sq != sk:
                raise ValueError(f"model.core_attention=sdpa: causal attention needs sq == sk (got {sq}, {sk})")
            causal = True
        kw = {"enable_gqa": True} if gqa else {}
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
                                             **kw)
        return ctx.permute(2, 0, 1, 3).reshape(sq, query.shape[1], self.hidden_per_partition)


def with_sdpa(spec):
    """`spec` (a layer ModuleSpec, or a block spec's TransformerBlockSubmodules) with every
    self-attention's core attention replaced by SDPAttention."""
    if hasattr(spec, "layer_specs"):  # TransformerBlockSubmodules
        return replace(spec, layer_specs=[with_sdpa(s) for s in spec.layer_specs])
    attn = spec.submodules.self_attention
    attn = replace(attn, submodules=replace(attn.submodules, core_attention=SDPAttention))
    return replace(spec, submodules=replace(spec.submodules, self_attention=attn))

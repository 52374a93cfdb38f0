"""Forward hooks that accumulate activation statistics from outside megatron-core's modules.

Each hook accumulates its statistics and gives them as one `packed()` tensor to reduce across ranks;
`attach_hooks` returns a `HookSet` that must be removed (use it as a context manager: removal happens
in `finally`).
Hooks see only this rank's shard: TP-sharded signals (heads, neurons) are local slices, PP stages see
only their own layers; `megaslim.importance.reduce` assembles the full logical scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from megaslim.importance.experts import attach_expert_hooks, is_moe_layer
from megaslim.importance.stats import SampleStats, seq_reduce


@dataclass
class CalibContext:
    """Which rows of the current micro-batch are real samples (the last micro-batch may be padded)."""
    valid: Optional[torch.Tensor] = None  # [b] bool

    def rows(self, per_sample: torch.Tensor) -> torch.Tensor:
        return per_sample if self.valid is None else per_sample[self.valid.to(per_sample.device)]


class _Hook:
    kind = ""

    def __init__(self, module: torch.nn.Module, ctx: CalibContext, layer: Optional[int]):
        self.module, self.ctx, self.layer = module, ctx, layer
        self.handle = None

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class MagnitudeHook(_Hook):
    """Per-token activations [s, b, n] of some signal -> seq_agg of |a| per sample -> SampleStats."""

    def __init__(self, module, ctx, layer, *, n: int, seq_agg: str):
        super().__init__(module, ctx, layer)
        self.seq_agg = seq_agg
        self.stats = SampleStats(n)

    def accumulate(self, mag: torch.Tensor) -> None:
        self.stats.add(self.ctx.rows(seq_reduce(mag, self.seq_agg)))

    def packed(self) -> torch.Tensor:
        """[n, 3] (count, sum, sumsq) over this rank's samples (SampleStats.packed)."""
        return self.stats.packed()


class HeadHook(MagnitudeHook):
    """Input of linear_proj split per head: L2 over head_dim of each head's attention output."""
    kind = "heads"

    def __init__(self, module, ctx, layer, *, heads: int, head_dim: int, seq_agg: str):
        super().__init__(module, ctx, layer, n=heads, seq_agg=seq_agg)
        self.heads, self.head_dim = heads, head_dim
        self.handle = module.register_forward_pre_hook(self._pre)

    def _pre(self, module, args):
        x = args[0]
        s, b = x.shape[:2]
        self.accumulate(torch.linalg.vector_norm(x.detach().reshape(s, b, self.heads, self.head_dim), dim=-1))


class NeuronHook(MagnitudeHook):
    """MLP neurons: |linear_fc2 input| (post-activation, `fc2_input`) or |X W1^T| (`fc1_output`): the up
    projection of a gated (SwiGLU) MLP, the whole fc1 output of a non-gated one (squared ReLU: fc1 row i is
    neuron i). `gated` must be the model's `config.gated_linear_unit`."""
    kind = "neurons"

    def __init__(self, mlp, ctx, layer, *, ffn_local: int, signal: str, seq_agg: str, gated: bool = True):
        super().__init__(mlp, ctx, layer, n=ffn_local, seq_agg=seq_agg)
        self.ffn_local, self.gated = ffn_local, gated
        if signal == "fc2_input":
            self.handle = mlp.linear_fc2.register_forward_pre_hook(
                lambda m, args: self.accumulate(args[0].detach()))
        else:
            self.handle = mlp.linear_fc1.register_forward_hook(self._fc1_out)

    def _fc1_out(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if out.shape[-1] != (2 if self.gated else 1) * self.ffn_local:
            raise ValueError(f"linear_fc1 output width {out.shape[-1]} does not fit ffn_local={self.ffn_local} "
                             f"with gated={self.gated}")
        # Each TP shard of a gated fc1 is [gate_r; up_r]: the up rows are the second half. Non-gated: all of it.
        up = out[..., self.ffn_local:] if self.gated else out
        self.accumulate(up.detach())


class NormHook(MagnitudeHook):
    """Embedding channels: |output| of a norm (input_layernorm, pre_mlp_layernorm, final norm)."""
    kind = "channels"

    def __init__(self, norm, ctx, layer, *, hidden: int, seq_agg: str, name: str):
        super().__init__(norm, ctx, layer, n=hidden, seq_agg=seq_agg)
        self.name = name
        self.handle = norm.register_forward_hook(
            lambda m, args, out: self.accumulate((out[0] if isinstance(out, tuple) else out).detach()))


class BlockImportanceHook(_Hook):
    """Block Importance (ShortGPT): 1 - cos(hidden in, hidden out), summed over real tokens."""
    kind = "layer_bi"

    def __init__(self, layer_module, ctx, layer):
        super().__init__(layer_module, ctx, layer)
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        self.handle = layer_module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        hin = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        hout = output[0] if isinstance(output, tuple) else output
        # 1 - cos = |a/|a| - b/|b||^2 / 2: no cancellation for nearly parallel states, so fp32 keeps
        # ~1e-7 relative accuracy (1 - cosine_similarity would need float64, 10x slower)
        a, b = F.normalize(hin.detach().float(), dim=-1), F.normalize(hout.detach().float(), dim=-1)
        dist = 0.5 * (a - b).pow(2).sum(-1).double()  # [s, b]
        dist = self.ctx.rows(dist.t())  # [b_valid, s]
        self.total += dist.sum().cpu()
        self.count += dist.numel()

    def packed(self) -> torch.Tensor:
        """[2] (sum of 1 - cos, token count) over this rank's samples."""
        return torch.stack([self.total, self.count])


@dataclass
class HookSet:
    hooks: list = field(default_factory=list)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def of_kind(self, kind: str) -> list:
        return [h for h in self.hooks if h.kind == kind]

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach_hooks(model, ctx: CalibContext, *, seq_agg: str, neuron_signal: str) -> HookSet:
    """Hooks for every score kind on this rank's layers. On any error, already attached hooks are removed."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    cfg = model.config
    hs = HookSet()
    try:
        for layer in model.decoder.layers:
            i = layer.layer_number - 1  # global index
            attn, mlp = layer.self_attention, layer.mlp
            hs.hooks.append(HeadHook(attn.linear_proj, ctx, i, heads=cfg.num_attention_heads // tp,
                                     head_dim=cfg.kv_channels, seq_agg=seq_agg))
            if not is_moe_layer(mlp):  # an MoE layer's experts: megaslim.importance.experts
                hs.hooks.append(NeuronHook(mlp, ctx, i, ffn_local=cfg.ffn_hidden_size // tp,
                                           signal=neuron_signal, seq_agg=seq_agg, gated=cfg.gated_linear_unit))
            hs.hooks.append(NormHook(layer.input_layernorm, ctx, i, hidden=cfg.hidden_size,
                                     seq_agg=seq_agg, name=f"{i}.input_layernorm"))
            hs.hooks.append(NormHook(layer.pre_mlp_layernorm, ctx, i, hidden=cfg.hidden_size,
                                     seq_agg=seq_agg, name=f"{i}.pre_mlp_layernorm"))
            hs.hooks.append(BlockImportanceHook(layer, ctx, i))
        if getattr(model, "arch", None) is not None:
            hs.hooks.extend(attach_expert_hooks(model, ctx, model.arch, seq_agg=seq_agg))
        final = getattr(model.decoder, "final_layernorm", None)
        if final is not None:
            hs.hooks.append(NormHook(final, ctx, None, hidden=cfg.hidden_size, seq_agg=seq_agg,
                                     name="final_layernorm"))
    except BaseException:
        hs.remove()
        raise
    return hs

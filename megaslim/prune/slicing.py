"""Slice full logical megatron tensors by a PrunePlan: the one table of which dimension each tensor carries.

Works on the tensors of whatever this pipeline stage holds (global names); layers are renumbered.
"""
from __future__ import annotations

import re

import torch

from megaslim.model.arch import ModelArch
from megaslim.prune.experts import expert_suffix, slice_moe_tensor
from megaslim.prune.plan import PrunePlan

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HIDDEN_NORMS = tuple(f"{norm}{kind}" for norm in ("input_layernorm.", "pre_mlp_layernorm.",
                                                  "self_attention.linear_qkv.layer_norm_",
                                                  "mlp.linear_fc1.layer_norm_")
                      for kind in ("weight", "bias"))


def _heads_in_order(arch: ModelArch, groups: list[int], heads: list[int]) -> list[int]:
    """Kept heads ordered group by group (in `groups` order), keeping their order inside a group;
    linear_qkv rows and linear_proj columns must both follow this order."""
    n = arch.heads_per_group
    return [h for g in groups for h in heads if h // n == g]


def _qkv_rows(arch: ModelArch, groups: list[int], heads: list[int]) -> torch.Tensor:
    """Row indices of linear_qkv to keep: per kept group, its kept q heads then k and v ([q_1..q_n, k, v])."""
    n, hd = arch.heads_per_group, arch.kv_channels
    ordered = _heads_in_order(arch, groups, heads)
    rows = []
    for g in groups:
        base = g * (n + 2) * hd
        slots = [h - g * n for h in ordered if h // n == g] + [n, n + 1]  # q heads, then k, v
        for slot in slots:
            rows.extend(range(base + slot * hd, base + (slot + 1) * hd))
    return torch.tensor(rows, dtype=torch.long)


def _head_cols(arch: ModelArch, groups: list[int], heads: list[int]) -> torch.Tensor:
    hd = arch.kv_channels
    return torch.tensor([h * hd + d for h in _heads_in_order(arch, groups, heads) for d in range(hd)],
                        dtype=torch.long)


def _q_rows(arch: ModelArch, head: int) -> slice:
    """linear_qkv rows (or bias entries) of one head's query projection."""
    n, hd = arch.heads_per_group, arch.kv_channels
    g, j = divmod(head, n)
    start = g * (n + 2) * hd + j * hd
    return slice(start, start + hd)


def _proj_cols(arch: ModelArch, head: int) -> slice:
    return slice(head * arch.kv_channels, (head + 1) * arch.kv_channels)


def fold_tensor(suffix: str, t: torch.Tensor, layer: int, plan: PrunePlan, arch: ModelArch) -> torch.Tensor:
    """Fold pruned heads into the kept heads of their query group (plan.fold_heads), before slicing.

    A head owns its query projection (its rows of linear_qkv, and of the QKV bias) and its output
    projection (its columns of linear_proj); k and v belong to the whole group and are left alone.
      laco:     W_k <- W_k + sum_p (W_p - W_k) on both (LaCo's parameter-difference merge, per head)
      proj_sum: linear_proj columns W_k <- W_k + sum_p W_p, q rows unchanged: exact when head p attends
                like head k (same group, same k/v), so its output is kept through k's attention pattern.
    Other tensors are returned unchanged."""
    folds = plan.fold_heads.get(layer)
    if not folds or suffix not in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                                   "self_attention.linear_proj.weight"):
        return t
    proj = suffix == "self_attention.linear_proj.weight"
    if plan.fold_mode == "proj_sum" and not proj:
        return t
    src, out = t, t.clone()
    for k, pruned in folds.items():
        if proj:
            wk, wp = src[:, _proj_cols(arch, k)], [src[:, _proj_cols(arch, p)] for p in pruned]
        else:
            wk, wp = src[_q_rows(arch, k)], [src[_q_rows(arch, p)] for p in pruned]
        new = wk + sum(wp) if plan.fold_mode == "proj_sum" else wk + sum(w - wk for w in wp)
        if proj:
            out[:, _proj_cols(arch, k)] = new
        else:
            out[_q_rows(arch, k)] = new
    return out


def slice_tensor(suffix: str, t: torch.Tensor, layer: int | None, plan: PrunePlan, arch: ModelArch) -> torch.Tensor:
    """The pruned version of one full tensor. `suffix` is the name without `decoder.layers.{i}.`."""
    ch = torch.tensor(plan.keep_channels, dtype=torch.long)
    if layer is None:
        if suffix in ("embedding.word_embeddings.weight", "output_layer.weight"):
            return t[:, ch]
        if suffix in ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias"):
            return t[ch]
        raise KeyError(f"no pruning rule for {suffix!r}")
    groups, heads, neurons = plan.keep_groups[layer], plan.keep_heads[layer], plan.keep_neurons[layer]
    t = fold_tensor(suffix, t, layer, plan, arch)
    if suffix in _HIDDEN_NORMS:  # norm weights and (LayerNorm) biases carry the hidden channels
        return t[ch]
    moe = slice_moe_tensor(suffix, t, layer, plan, arch, ch) if arch.is_moe else None
    if moe is not None:
        return moe
    if suffix == "self_attention.linear_qkv.weight":
        return t[_qkv_rows(arch, groups, heads)][:, ch]
    if suffix == "self_attention.linear_qkv.bias":
        return t[_qkv_rows(arch, groups, heads)]
    if suffix in ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight",
                  "self_attention.q_layernorm.bias", "self_attention.k_layernorm.bias"):
        return t  # per-head-dim norms (shared by all heads): head_dim is never pruned
    if suffix == "self_attention.linear_proj.weight":
        return t[ch][:, _head_cols(arch, groups, heads)]
    if suffix == "mlp.linear_fc1.weight":
        nr = torch.tensor(neurons, dtype=torch.long)
        if not arch.gated:  # one up projection: neuron i is row i
            return t[nr][:, ch]
        gate, up = t.chunk(2, 0)  # full = [gate; up]: a neuron is gate row i and up row i
        return torch.cat([gate[nr], up[nr]], 0)[:, ch]
    if suffix == "mlp.linear_fc2.weight":
        return t[ch][:, torch.tensor(neurons, dtype=torch.long)]
    raise KeyError(f"no pruning rule for {suffix!r}")


def prune_state(state: dict[str, torch.Tensor], plan: PrunePlan | list[PrunePlan]) -> dict[str, torch.Tensor]:
    """Full logical tensors (global names) -> pruned full tensors (renumbered global names).
    Tensors of dropped layers are left out. A list of plans (iterative pruning) is applied in turn."""
    if isinstance(plan, (list, tuple)):
        for p in plan:
            state = prune_state(state, p)
        return state
    arch = plan.source_arch
    new_index = {old: new for new, old in enumerate(plan.keep_layers)}
    out = {}
    for name, t in state.items():
        m = _LAYER.match(name)
        if m is None:
            out[name] = slice_tensor(name, t, None, plan, arch).contiguous()
            continue
        layer, suffix = int(m.group(1)), m.group(2)
        new_suffix = expert_suffix(suffix, layer, plan)  # MoE: kept experts renumbered, dropped ones left out
        if layer not in new_index or new_suffix is None:
            continue
        out[f"decoder.layers.{new_index[layer]}.{new_suffix}"] = slice_tensor(suffix, t, layer, plan, arch).contiguous()
    return out

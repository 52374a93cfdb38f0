"""Mixture-of-experts pruning: which routed experts (and which neurons of each) a plan keeps, the pruned
shape, and the slicing rules of the MoE tensors (router rows go with their experts; kept experts are
renumbered in kept order; the shared expert keeps its neurons and loses only hidden channels)."""
from __future__ import annotations

import re
from typing import Optional

import torch

from megaslim.errors import MegaslimError
from megaslim.importance.experts import expert_ranking
from megaslim.model.arch import ModelArch

_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def moe_target(arch: ModelArch, export_config, *, tp: int) -> dict:
    """The MoE fields of the pruned ModelArch (prune.export_config.num_moe_experts / moe_ffn_hidden_size),
    checked before any compute; {} for a dense model (where setting them is an error)."""
    experts = getattr(export_config, "num_moe_experts", None)
    ffn = getattr(export_config, "moe_ffn_hidden_size", None)
    shared = getattr(export_config, "moe_shared_expert_intermediate_size", None)
    if not arch.is_moe:
        if experts is not None or ffn is not None or shared is not None:
            raise MegaslimError("prune.export_config.num_moe_experts / moe_ffn_hidden_size / "
                                "moe_shared_expert_intermediate_size need a mixture-of-experts model")
        return {}
    if getattr(export_config, "ffn_hidden_size", None) is not None:
        raise MegaslimError("prune.export_config.ffn_hidden_size: a mixture-of-experts model has no dense MLP; set "
                            "prune.export_config.moe_ffn_hidden_size (neurons kept in every expert)")
    experts = arch.num_moe_experts if experts is None else experts
    ffn = arch.moe_ffn_hidden_size if ffn is None else ffn
    if not arch.moe_router_topk <= experts <= arch.num_moe_experts:
        raise MegaslimError(f"prune.export_config.num_moe_experts={experts} must be between the router's top-k "
                            f"({arch.moe_router_topk}: each token needs that many experts) and the source's "
                            f"{arch.num_moe_experts}")
    if not 0 < ffn <= arch.moe_ffn_hidden_size:
        raise MegaslimError(f"prune.export_config.moe_ffn_hidden_size={ffn} must be in (0, {arch.moe_ffn_hidden_size}]")
    if ffn % tp:
        raise MegaslimError(f"prune.export_config.moe_ffn_hidden_size={ffn} is not divisible by TP={tp}")
    out = dict(num_moe_experts=experts, moe_ffn_hidden_size=ffn)
    if shared is not None:
        src = arch.moe_shared_expert_intermediate_size or 0
        if not 0 < shared <= src or shared % tp:
            raise MegaslimError(f"prune.export_config.moe_shared_expert_intermediate_size={shared} must be in "
                                f"(0, {src}] (the source's shared expert) and divisible by TP={tp}")
        out["moe_shared_expert_intermediate_size"] = shared
    if arch.family == "mixtral":  # Mixtral's intermediate_size is the experts' width
        out["ffn_hidden_size"] = ffn
    return out


def _topk_sorted(scores: torch.Tensor, k: int) -> list[int]:
    order = torch.argsort(-scores.double(), stable=True)
    return sorted(order[:k].tolist())


def choose_experts(scores, arch: ModelArch, target: ModelArch, keep_layers: list[int], *,
                   metric: str = "reap") -> tuple[dict, dict, dict]:
    """(kept experts per layer, kept neurons per layer and source expert, kept shared-expert neurons per
    layer): the `target.num_moe_experts` best experts by `metric`, each keeping its own
    `target.moe_ffn_hidden_size` best neurons, and the shared expert's best neurons."""
    if not arch.is_moe:
        return {}, {}, {}
    E, f = target.num_moe_experts, target.moe_ffn_hidden_size
    cut = (E, f) != (arch.num_moe_experts, arch.moe_ffn_hidden_size)
    ranking = expert_ranking(scores, metric) if scores is not None else None
    if cut and (ranking is None or scores.expert_neurons is None):
        raise MegaslimError("pruning experts needs expert importance scores (importance of this mixture-of-experts "
                            "model; a scores file saved before megaslim scored experts has none)")
    keep_experts, keep_neurons = {}, {}
    for layer in keep_layers:
        kept = (list(range(arch.num_moe_experts)) if E == arch.num_moe_experts
                else _topk_sorted(ranking[layer], E))
        keep_experts[layer] = kept
        keep_neurons[layer] = {e: list(range(f)) if f == arch.moe_ffn_hidden_size
                               else _topk_sorted(scores.expert_neurons[layer, e], f) for e in kept}
    return keep_experts, keep_neurons, _choose_shared(scores, arch, target, keep_layers)


def _choose_shared(scores, arch: ModelArch, target: ModelArch, keep_layers: list[int]) -> dict[int, list[int]]:
    fs = target.moe_shared_expert_intermediate_size
    if fs == arch.moe_shared_expert_intermediate_size:
        return {}  # all kept
    if scores is None or getattr(scores, "shared_expert_neurons", None) is None:
        raise MegaslimError("pruning the shared expert needs its neuron scores (importance of this model)")
    return {layer: _topk_sorted(scores.shared_expert_neurons[layer], fs) for layer in keep_layers}


def expert_suffix(suffix: str, layer: int, plan) -> Optional[str]:
    """The pruned name of an MoE tensor (`suffix` within the layer): kept experts renumbered in kept order,
    None for a dropped expert's tensors; other names unchanged."""
    m = _EXPERT.match(suffix)
    kept = getattr(plan, "keep_experts", {}).get(layer)
    if m is None or kept is None:
        return suffix
    e = int(m.group(1))
    return f"mlp.experts.local_experts.{kept.index(e)}.{m.group(2)}" if e in kept else None


def slice_moe_tensor(suffix: str, t: torch.Tensor, layer: int, plan, arch: ModelArch,
                     ch: torch.Tensor) -> Optional[torch.Tensor]:
    """The pruned full tensor of an MoE layer's `suffix` (hidden channels `ch` kept), or None if `suffix`
    is not an MoE tensor."""
    kept = getattr(plan, "keep_experts", {}).get(layer)
    if suffix == "mlp.router.weight":
        rows = torch.tensor(kept, dtype=torch.long) if kept is not None else torch.arange(t.shape[0])
        return t[rows][:, ch]
    shared = getattr(plan, "keep_shared_neurons", {}).get(layer)
    sr = torch.tensor(shared, dtype=torch.long) if shared is not None else None
    if suffix == "mlp.shared_experts.gate_weight":
        return t[:, ch]
    if suffix == "mlp.shared_experts.linear_fc1.weight":
        if sr is None:
            return t[:, ch]
        gate, up = t.chunk(2, 0)
        return torch.cat([gate[sr], up[sr]], 0)[:, ch]
    if suffix == "mlp.shared_experts.linear_fc2.weight":
        return t[ch] if sr is None else t[ch][:, sr]
    m = _EXPERT.match(suffix)
    if m is None:
        return None
    e, rest = int(m.group(1)), m.group(2)
    neurons = getattr(plan, "keep_expert_neurons", {}).get(layer, {}).get(e)
    nr = torch.tensor(neurons, dtype=torch.long) if neurons is not None else torch.arange(arch.moe_ffn_hidden_size)
    if rest == "linear_fc1.weight":
        gate, up = t.chunk(2, 0)  # [gate; up]: a neuron is gate row i and up row i
        return torch.cat([gate[nr], up[nr]], 0)[:, ch]
    if rest == "linear_fc2.weight":
        return t[ch][:, nr]
    return None

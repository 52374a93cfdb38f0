"""Mixture-of-experts importance: per routed expert, REAP (router weight x expert output norm) and the L2 form
over the tokens routed to it, its routing frequency, and per-expert neuron scores for `moe_ffn_hidden_size`.

Hooks attach from outside megatron-core: the router (which tokens go where; the padded rows of the last
micro-batch are left out), each local expert MLP (its output is already scaled by the token's router
weight: megatron applies the probabilities before `linear_fc2`) and each expert's `linear_fc2` input.
A sample's tokens go to different experts, so these are per-token sums (count, sum, sum of squares), which
add up across micro-batches, DP and EP ranks alike; `reduce_expert_stats` sums them over the stage (DP
group: every token is seen by exactly one holder of its expert) and then over PP.
Under TP every TP rank routes the same tokens and the dispatcher gathers all of their copies; an expert's
output there is a partial sum over its ffn shard: the hooks count one copy of each token and sum the
expert's output over the expert-TP group before its norm; neuron scores are per shard, gathered at the end.
"""
from __future__ import annotations

from typing import Optional

import torch

from megaslim.errors import MegaslimError
from megaslim.importance.stats import SampleStats, seq_reduce
from megaslim.model.arch import ModelArch
from megaslim.runtime.layout import ParallelLayout

EXPERT_METRICS = ("reap", "l2")
EXPERT_TENSORS = ("expert_reap", "expert_l2", "expert_frequency", "expert_weight", "expert_neurons",
                  "shared_expert_neurons")
# per expert: routed tokens, sum of w*|f(x)| (REAP), sum of |f(x)|^2 (L2 form), sum of router weights w
_COUNT, _REAP, _L2SQ, _WSUM = range(4)


def expert_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """The shapes of an MoE model's expert score tensors."""
    le = (arch.num_layers, arch.num_moe_experts)
    out = {**{n: le for n in EXPERT_TENSORS[:4]}, "expert_neurons": (*le, arch.moe_ffn_hidden_size)}
    if arch.moe_shared_expert_intermediate_size:
        out["shared_expert_neurons"] = (arch.num_layers, arch.moe_shared_expert_intermediate_size)
    return out


def is_moe_layer(mlp) -> bool:
    return hasattr(mlp, "router") and hasattr(mlp, "experts")


class ExpertHooks:
    """Every hook on one MoE layer; `packed()` gives its statistics as full-size (all experts) tensors."""
    kind = "experts"

    def __init__(self, mlp, ctx, layer: int, *, num_experts: int, offset: int):
        local = mlp.experts.local_experts
        ffn = local[0].linear_fc2.weight.shape[1]
        self.ctx, self.layer, self.offset = ctx, layer, offset
        self.stats = torch.zeros(num_experts, 4, dtype=torch.float64)
        self.neurons = torch.zeros(num_experts, ffn, 2, dtype=torch.float64)  # sum |a|, sum a^2 (fc2 input)
        self.routed = torch.zeros(num_experts, dtype=torch.float64)  # this rank's tokens routed to each expert
        self.tokens = torch.zeros((), dtype=torch.float64)  # this rank's real tokens through the layer
        self._masks: dict[int, torch.Tensor] = {}
        self.n_local = len(local)
        self.handles = [mlp.router.register_forward_hook(self._routed)]
        for j, expert in enumerate(local):
            self.handles.append(expert.register_forward_hook(lambda m, a, o, j=j: self._output(j, a, o)))
            self.handles.append(expert.linear_fc2.register_forward_pre_hook(lambda m, a, j=j: self._fc2_in(j, a)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _routed(self, module, args, output) -> None:
        s, b = args[0].shape[:2]
        routing_map = output[1].detach().bool()  # [s*b tokens, experts], token = position * b + row
        valid = torch.ones(b, dtype=torch.bool) if self.ctx.valid is None else self.ctx.valid.bool().cpu()
        valid = valid.unsqueeze(0).expand(s, b).reshape(-1)
        self.tokens += valid.sum()
        self.routed += routing_map.cpu()[valid].sum(0).double()
        valid, routing_map = _gather_over_ep(valid) & _first_tp_copy(valid.numel()), _gather_over_ep(routing_map.cpu())
        # megatron's permute gives each expert its tokens in ascending token order (all EP ranks' tokens)
        self._masks = {j: valid[routing_map[:, self.offset + j]] for j in range(self.n_local)}

    def _mask(self, j: int, n: int) -> torch.Tensor:
        mask = self._masks.get(j)
        if mask is None or mask.numel() != n:
            raise MegaslimError(f"layer {self.layer}: expert {self.offset + j} received {n} tokens, the router "
                                f"sent {None if mask is None else mask.numel()} (unsupported token dispatcher?)")
        return mask

    def _output(self, j: int, args, output) -> None:
        out = (output[0] if isinstance(output, tuple) else output).detach().float()
        mask = self._mask(j, out.shape[0])
        w = args[1].detach().float()[mask].double() if len(args) > 1 else torch.ones(int(mask.sum()))
        norm = torch.linalg.vector_norm(_sum_over_expert_tp(out[mask]), dim=-1).double().cpu()  # = w * |f(x)|
        row = self.stats[self.offset + j]
        row[_COUNT] += mask.sum()
        row[_REAP] += norm.sum()
        row[_L2SQ] += (norm / w.cpu().clamp_min(1e-30)).pow(2).sum()
        row[_WSUM] += w.sum().cpu()

    def _fc2_in(self, j: int, args) -> None:
        a = args[0].detach().float()
        a = a[self._mask(j, a.shape[0])].abs().double().cpu()
        self.neurons[self.offset + j, :, 0] += a.sum(0)
        self.neurons[self.offset + j, :, 1] += a.pow(2).sum(0)

    def packed(self) -> torch.Tensor:
        """[experts, 6 + 2 * ffn]: stats, router-side count, real tokens, neuron sums: one tensor to reduce."""
        tokens = self.tokens.expand(self.routed.shape[0], 1)
        neurons = _expert_tp_all_gather(self.neurons, dim=1)  # ffn shards in rank order = the full ffn
        return torch.cat([self.stats, self.routed[:, None], tokens, neurons.flatten(1)], 1)


class SharedNeuronHook:
    """The shared expert's neurons (every token goes through it): |linear_fc2 input| reduced per sample like a
    dense MLP's neurons (`importance.seq_agg`, then `batch_agg`)."""
    kind = "shared_neurons"

    def __init__(self, shared, ctx, layer: int, *, seq_agg: str):
        self.ctx, self.layer, self.seq_agg = ctx, layer, seq_agg
        self.stats = SampleStats(shared.linear_fc2.weight.shape[1])
        self.handle = shared.linear_fc2.register_forward_pre_hook(lambda m, a: self._add(a[0]))

    def _add(self, a: torch.Tensor) -> None:  # [s, b, ffn]
        self.stats.add(self.ctx.rows(seq_reduce(a.detach(), self.seq_agg)))

    def remove(self) -> None:
        self.handle.remove()

    def packed(self) -> torch.Tensor:
        return ParallelLayout.tp_gather(self.stats.packed(), 0)  # TP ranks hold contiguous neuron blocks


def _expert_group(tp_only: bool):
    """The expert-TP group (`tp_only`) or the expert TP x EP group; None where it has one rank."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    group = ps.get_expert_tensor_parallel_group() if tp_only else ps.get_expert_tensor_and_model_parallel_group()
    return group if group is not None and torch.distributed.get_world_size(group) > 1 else None


def _gather_over_ep(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every rank of the expert (TP x EP) group in rank order, as megatron's
    allgather dispatcher gathers the tokens; `t` itself with one rank there."""
    return _all_gather(t, _expert_group(tp_only=False), dim=0)


def _expert_tp_all_gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    return _all_gather(t, _expert_group(tp_only=True), dim=dim)


def _all_gather(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    return t if group is None else torch.cat(ParallelLayout.gather_parts(t, group), dim)


def _first_tp_copy(n: int) -> torch.Tensor:
    """Over the gathered tokens: True for those sent by an expert-TP rank 0 (the other TP ranks send copies)."""
    from megatron.core import parallel_state as ps

    rank = ps.get_expert_tensor_parallel_rank() if _expert_group(tp_only=True) is not None else 0
    return _gather_over_ep(torch.full((n,), rank, dtype=torch.int64)) == 0


def _sum_over_expert_tp(x: torch.Tensor) -> torch.Tensor:
    """An expert's output rows summed over its ffn shards (a partial sum on each expert-TP rank)."""
    group = _expert_group(tp_only=True)
    return x if group is None else ParallelLayout.all_reduce(x, group)


def attach_expert_hooks(model, ctx, arch: ModelArch, *, seq_agg: str = "mean") -> list:
    """ExpertHooks (and a SharedNeuronHook where there is a shared expert) on every MoE layer of this rank
    (empty for a dense model)."""
    from megaslim.model.expert_parallel import local_offset

    if not arch.is_moe:
        return []
    offset, hooks = local_offset(arch.num_moe_experts), []
    for layer in model.decoder.layers:
        i, mlp = layer.layer_number - 1, layer.mlp
        if not is_moe_layer(mlp):
            continue
        hooks.append(ExpertHooks(mlp, ctx, i, num_experts=arch.num_moe_experts, offset=offset))
        if getattr(mlp, "shared_experts", None) is not None:
            hooks.append(SharedNeuronHook(mlp.shared_experts, ctx, i, seq_agg=seq_agg))
    return hooks


def reduce_expert_stats(hooks, arch: ModelArch, *, batch_agg: str) -> dict[str, torch.Tensor]:
    """Full [layers, experts(, ffn)] expert scores (`hooks`: a HookSet), identical on every rank whatever the
    EP/PP/DP layout."""
    from megatron.core import parallel_state as ps

    if not arch.is_moe:
        return {}
    E, f, L = arch.num_moe_experts, arch.moe_ffn_hidden_size, arch.num_layers
    packed = torch.zeros(L, E, 6 + 2 * f, dtype=torch.float64)
    shared = torch.zeros(L, arch.moe_shared_expert_intermediate_size or 0, 3, dtype=torch.float64)
    for h in hooks.of_kind("experts"):
        packed[h.layer] = h.packed()
    for h in hooks.of_kind("shared_neurons"):
        shared[h.layer] = h.packed()
    groups = [ps.get_data_parallel_group()]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        groups.append(ps.get_pipeline_model_parallel_group())
    for group in groups:
        packed, shared = ParallelLayout.all_reduce(packed, group), ParallelLayout.all_reduce(shared, group)
    out = expert_scores(packed, batch_agg=batch_agg)
    if arch.moe_shared_expert_intermediate_size:
        out["shared_expert_neurons"] = torch.nan_to_num(SampleStats.finalize(shared, batch_agg))
    return out


def expert_scores(packed: torch.Tensor, *, batch_agg: str) -> dict[str, torch.Tensor]:
    """Reduced statistics -> scores. expert_reap: sum over routed tokens of w * |f(x)| (REAP-style);
    expert_l2: sqrt(sum over routed tokens of |f(x)|^2) (the router weight left out); expert_frequency:
    fraction of tokens routed to the expert; expert_neurons: `batch_agg` of |fc2 input| over routed tokens."""
    count = packed[..., _COUNT]
    tokens = packed[..., 5].clamp_min(1)
    sums = packed[..., 6:].unflatten(-1, (-1, 2))  # [L, E, ffn, 2]
    stats = torch.stack([count[..., None].expand_as(sums[..., 0]), sums[..., 0], sums[..., 1]], -1)
    return {
        "expert_reap": packed[..., _REAP],
        "expert_l2": packed[..., _L2SQ].sqrt(),
        "expert_frequency": packed[..., 4] / tokens,
        "expert_weight": packed[..., _WSUM] / count.clamp_min(1),  # mean router weight when routed
        "expert_neurons": torch.nan_to_num(SampleStats.finalize(stats, batch_agg)),
    }


def expert_ranking(scores, metric: str) -> Optional[torch.Tensor]:
    """[layers, experts] scores of `metric` (reap | l2 | frequency) from an ImportanceScores, or None."""
    if metric not in (*EXPERT_METRICS, "frequency"):
        raise MegaslimError(f"unknown expert metric {metric!r}; one of {(*EXPERT_METRICS, 'frequency')}")
    return getattr(scores, f"expert_{metric}", None)


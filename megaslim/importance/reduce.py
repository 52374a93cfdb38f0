"""Assemble full logical scores from every rank's hook statistics (DP sum, TP gather, PP gather).

After `reduce_scores` every rank holds the same full [layers, ...] tensors whatever the TP/PP/DP layout.
"""
from __future__ import annotations

import torch

from megaslim.importance.experts import reduce_expert_stats
from megaslim.importance.hooks import HookSet
from megaslim.importance.stats import SampleStats
from megaslim.model.arch import ModelArch
from megaslim.runtime.layout import ParallelLayout


def reduce_scores(hooks: HookSet, arch: ModelArch, *, batch_agg: str) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state as ps

    dp_group, pp_group = ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()
    L = arch.num_layers
    heads = torch.zeros(L, arch.num_attention_heads, dtype=torch.float64)
    neurons = torch.zeros(L, arch.ffn_hidden_size, dtype=torch.float64)
    channels = torch.zeros(arch.hidden_size, dtype=torch.float64)
    bi = torch.zeros(L, dtype=torch.float64)

    for kind, target in (("heads", heads), ("neurons", neurons)):
        for h in hooks.of_kind(kind):
            # each TP rank holds a contiguous block of the heads / neurons
            packed = ParallelLayout.tp_gather(ParallelLayout.all_reduce(h.packed(), dp_group), 0)
            target[h.layer] = SampleStats.finalize(packed, batch_agg)
    for h in hooks.of_kind("channels"):
        # replicated under TP: every TP rank holds the same statistics, so no TP sum (no double count)
        channels += SampleStats.finalize(ParallelLayout.all_reduce(h.packed(), dp_group), batch_agg)
    for h in hooks.of_kind("layer_bi"):
        total, count = ParallelLayout.all_reduce(h.packed(), dp_group)
        bi[h.layer] = total / count

    # Each pipeline stage filled only its own layers (zeros elsewhere): a PP sum assembles them.
    if ps.get_pipeline_model_parallel_world_size() > 1:
        heads, neurons, channels, bi = (ParallelLayout.all_reduce(t, pp_group) for t in (heads, neurons, channels, bi))
    groups = heads.reshape(L, arch.num_query_groups, arch.heads_per_group).sum(-1)
    return {"heads": heads, "query_groups": groups, "neurons": neurons, "channels": channels,
            "layer_bi": bi, **reduce_expert_stats(hooks, arch, batch_agg=batch_agg)}

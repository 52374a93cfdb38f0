"""Workarounds for megatron-core behaviour that differs across releases or setups, in one place.

Each entry says which versions/setups need it and why; remove an entry once the minimum supported
megatron-core no longer needs it.
"""
from __future__ import annotations

import torch

from megaslim.model.layout import Layout, layout_of


def prepare_distributed_optimizer_for_load(optimizer) -> None:
    """megatron-core 0.16 DistributedOptimizer without apex/TE (torch Adam, e.g. on CPU):
    - `state_dict()` asserts that every Adam state has a `step`, so states must exist before a
      sharded state dict for loading can be built (megatron's own dummy-init helper does that);
    - loading the `fully_reshardable` format copies every per-param state key, but the checkpoint
      carries no per-param `step` (it travels in param_groups): let `step` copy onto itself."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(sub, "_set_main_param_and_optimizer_states"):
            continue  # not a DistributedOptimizer
        if not sub.optimizer.state:
            sub._init_optimizer_states_with_dummy_values()
        original = sub._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, sub=sub, original=original):
            group_index, group_order = sub.model_param_group_index_map[model_param]
            main_param = sub.optimizer.param_groups[group_index]["params"][group_order]
            step = sub.optimizer.state.get(main_param, {}).get("step")
            if step is not None and "step" not in tensors:
                tensors = {**tensors, "step": step}
            return original(model_param, tensors)

        sub._set_main_param_and_optimizer_states = set_states


def unshare_adam_steps(optimizer) -> None:
    """megatron-core 0.16 DistributedOptimizer.load_state_dict without apex/TE gives every torch Adam
    state one shared `step` tensor; torch increments it once per parameter, so after a resume at DP>1
    the bias correction ran ahead (step 2 -> 11 in one step on a 9-tensor model). One tensor each."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def mark_tensor_parallel_params(model) -> None:
    """megatron-core 0.16 (tensor_parallel/layers.py): the local VocabParallelEmbedding and
    Column/RowParallelLinear set `tensor_model_parallel` / `partition_dim` / `partition_stride` on their
    weights only inside `_initialize_affine_weight_cpu/_gpu`, i.e. only with `config.perform_initialization`.
    megaslim builds every model with it off (weights are loaded; model/build.py), so the TP-split weights
    looked replicated: the optimizer's `get_main_grads_for_grad_norm` (and `count_zeros_fp32`) keeps such a
    parameter on TP rank 0 only (`param_is_not_tensor_parallel_duplicate`), so at TP>1 the reported grad norm
    missed the other ranks' shards and `train.clip_grad` clipped by that wrong norm (gradients and the
    unclipped update were right). Set them here from megaslim's layout table, before DDP and the optimizer
    are built (the optimizer copies them onto its main params). Upstream sets them irrespective of
    initialisation since NVIDIA/Megatron-LM PR #4084 (merged 2026-03; the first release with it is not
    verified here). Attributes already present (initialised weights, Transformer Engine layers, fixed
    releases) are left as they are, so the entry is harmless there; remove it once the minimum
    megatron-core includes that fix."""
    gated = model.config.gated_linear_unit
    for name, param in model.named_parameters():
        layout = layout_of(name, gated=gated)
        if layout is Layout.REPLICATED or getattr(param, "tensor_model_parallel", False):
            continue
        param.tensor_model_parallel = True
        param.partition_dim = 1 if layout is Layout.ROW else 0
        param.partition_stride = 1


def define_moe_te_names() -> None:
    """megatron-core 0.16 (transformer/moe/moe_utils.py) imports `te_general_gemm` (and the fused MoE
    kernels) only inside `try: import transformer_engine`, yet the router's `router_gating_linear` reads
    `te_general_gemm` unconditionally: without Transformer Engine (CPU, or a GPU machine without TE) every
    MoE forward dies with a NameError. Define the names it tests against None (their fallbacks are plain
    torch), only when the import did not; called when an MoE model is built. Remove once the minimum
    megatron-core defines them in its fallback branch."""
    from megatron.core.transformer.moe import moe_utils

    if not getattr(moe_utils, "HAVE_TE", False) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

"""Workarounds for megatron-core behaviour that differs across releases or setups, in one place.

Each entry says which versions/setups need it and why; remove an entry once the minimum supported
megatron-core no longer needs it.
"""
from __future__ import annotations


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

"""Iterative pruning (`prune.iterative: N`): N partial steps from the source shape to the target, scores
recomputed on the partly pruned model before each step; the step plans compose into one plan on the source.

Runs the intermediate models in memory at the source TP with PP=1 (re-scoring needs the whole model on
every stage); the final plans are then applied to the source like a single-shot plan, at any TP/PP out.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional

from megaslim.errors import MegaslimError
from megaslim.importance.scores import ImportanceScores
from megaslim.model.arch import ModelArch
from megaslim.prune.plan import PrunePlan, build_plan
from megaslim.prune.slicing import _heads_in_order
from megaslim.prune.student import student_from_plan


def _round_multiple(x: float, multiple: int, lo: int, hi: int) -> int:
    """Nearest multiple of `multiple` to x (halves up), within [lo, hi] (both multiples themselves)."""
    v = int(math.floor(x / multiple + 0.5)) * multiple
    return min(max(v, lo), hi)


def _between(arch: ModelArch, target: ModelArch, f: float, tp: int) -> ModelArch:
    """The valid shape a fraction `f` of the way from `arch` to `target` (each dimension rounded)."""
    def rnd(name: str, multiple: int) -> int:
        x = getattr(arch, name) + (getattr(target, name) - getattr(arch, name)) * f
        return _round_multiple(x, multiple, getattr(target, name), getattr(arch, name))

    groups = rnd("num_query_groups", tp)
    hpg = arch.heads_per_group + (target.heads_per_group - arch.heads_per_group) * f
    hpg = _round_multiple(hpg, 1, target.heads_per_group, arch.heads_per_group)
    return replace(arch, num_query_groups=groups, num_attention_heads=groups * hpg,
                   ffn_hidden_size=rnd("ffn_hidden_size", tp), hidden_size=rnd("hidden_size", 1),
                   num_layers=rnd("num_layers", 1))


def step_shapes(arch: ModelArch, target: ModelArch, steps: int, *, tp: int = 1) -> list[ModelArch]:
    """The shape after each of `steps` steps: every dimension interpolated linearly from source to target
    and rounded to a valid value (query groups and ffn divisible by TP, heads = groups x heads per group
    with heads per group between the target's and the source's); the last shape is the target exactly.
    Steps that would change nothing are dropped."""
    if steps < 1:
        raise MegaslimError(f"prune.iterative={steps} must be >= 1")
    shapes: list[ModelArch] = []
    for i in range(1, steps + 1):
        shape = target if i == steps else _between(arch, target, i / steps, tp)
        if shape != (shapes[-1] if shapes else arch):
            shapes.append(shape)
    return shapes


def compose_plans(plans: list[PrunePlan], *, drop_folds: bool = False) -> PrunePlan:
    """One plan on the first plan's source that keeps what the chain keeps, in the same order.
    Head folds do not compose (they change weights between steps): the chain itself is what reproduces
    folded weights, so folded steps are refused unless `drop_folds` (a composed plan for review only)."""
    if any(p.fold_heads for p in plans) and not drop_folds:
        raise MegaslimError("plans with folded heads do not compose; apply the chain of step plans")
    plans = [replace(p, fold_heads={}) for p in plans]
    out = plans[0]
    for nxt in plans[1:]:
        if nxt.source != out.target:
            raise MegaslimError("plans do not chain: a step's source is not the previous step's target")
        arch = out.source_arch
        layers = [out.keep_layers[j] for j in nxt.keep_layers]
        groups, heads, neurons = {}, {}, {}
        for j in nxt.keep_layers:
            src = out.keep_layers[j]
            groups[src] = [out.keep_groups[src][g] for g in nxt.keep_groups[j]]
            # head m of the intermediate model is the m-th head of the previous step's slicing order
            order = _heads_in_order(arch, out.keep_groups[src], out.keep_heads[src])
            heads[src] = [order[m] for m in nxt.keep_heads[j]]
            neurons[src] = [out.keep_neurons[src][i] for i in nxt.keep_neurons[j]]
        out = PrunePlan(source=out.source, target=nxt.target, keep_layers=layers,
                        keep_channels=[out.keep_channels[c] for c in nxt.keep_channels],
                        keep_groups=groups, keep_heads=heads, keep_neurons=neurons, fold_mode=out.fold_mode)
    return out


def iterative_plans(model, arch: ModelArch, target: ModelArch, steps: int, *,
                    score: Callable[[object, ModelArch, int], ImportanceScores], model_cfg, tp: int = 1,
                    first_scores: Optional[ImportanceScores] = None,
                    on_step: Optional[Callable[[int, PrunePlan, object], None]] = None,
                    **plan_kw) -> list[PrunePlan]:
    """The chain of step plans. `score(model, arch, step)` computes importance on a (partly pruned)
    model; `first_scores` (already computed on the source) saves the first pass. `on_step(step, plan,
    pruned_model)` runs after each intermediate step (pruned_model is None after the last one).
    `plan_kw` goes to build_plan (layer_metric, contiguous, fold_heads)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() != 1:
        raise MegaslimError("prune.iterative > 1 re-scores the partly pruned model in memory and needs "
                            "parallel.pipeline_model_parallel_size=1 (the written model can still use any PP: "
                            "prune.target_pipeline_model_parallel_size)")
    shapes = step_shapes(arch, target, steps, tp=tp)
    plans: list[PrunePlan] = []
    cur, cur_arch = model, arch
    for i, shape in enumerate(shapes):
        scores = first_scores if i == 0 and first_scores is not None else score(cur, cur_arch, i)
        plan = build_plan(cur_arch, shape, scores, **plan_kw)
        plans.append(plan)
        nxt = None
        if i < len(shapes) - 1:
            nxt = student_from_plan(cur, plan, model_cfg)
            if cur is not model:
                del cur
            cur, cur_arch = nxt, plan.target_arch
        if on_step is not None:
            on_step(i, plan, nxt)
    return plans

"""`prune.target_params` / `prune.target_active_params`: choose the pruned shape for a parameter budget.

As ModelOpt's Minitron search: enumerate the shapes whose parameter count (or active count: the
parameters one token runs through, top-k experts of an MoE; a dense model's active count is its total,
as ModelOpt's `active_params`) is within the budget, each axis pruned by at most `max_width_pruning`
(hidden, ffn, heads; an MoE's experts, expert FFN and shared-expert FFN) or `max_depth_pruning` (layers);
keep the `top_k` nearest the budget (ties: more total parameters first, as ModelOpt); prune each from
the same importance scores, give it a short distillation from the unpruned model (the paper: light
retraining stabilises the ranking; the command passes it in, this library does not train), and pick the
lowest held-out loss. Enumeration is plain arithmetic on the shape, so bad budgets fail before any compute.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from megaslim import report
from megaslim.errors import MegaslimError
from megaslim.eval import evaluate_rows
from megaslim.model.arch import ModelArch, check_parallel_layout
from megaslim.prune.plan import build_plan
from megaslim.prune.student import student_from_plan

AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
MOE_AXES = ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
_ALIGN = 8  # ffn sizes (and Nemotron's hidden) are multiples of 8: tensor-core friendly
# A candidate's short training: (student, student_arch, candidate index) -> held-out loss after.
Train = Callable[[object, ModelArch, int], float]


@dataclass(frozen=True)
class Budget:
    """What the search keeps within: `value` parameters, all of them (prune.target_params) or the active
    ones (prune.target_active_params)."""
    value: float
    active: bool = False

    @classmethod
    def of(cls, prune) -> Optional["Budget"]:
        """The budget of a PruneConfig; None when the shape is not searched (both set: refused by validate)."""
        if prune.target_active_params is not None:
            return cls(float(prune.target_active_params), active=True)
        return None if prune.target_params is None else cls(float(prune.target_params))

    @property
    def key(self) -> str:
        return "prune.target_active_params" if self.active else "prune.target_params"

    @property
    def noun(self) -> str:
        return "active parameters" if self.active else "parameters"

    def count(self, arch: ModelArch) -> int:
        return arch.num_active_params() if self.active else arch.num_params()


def _width_values(size: int, search, divisor: int) -> list[int]:
    """size x (1, 1 - step, 1 - 2 step, ...) down to (1 - max_width_pruning), rounded down to `divisor`."""
    lowest = math.ceil(size * (1 - search.max_width_pruning))
    out, k = {size}, 1
    while (r := 1 - k * search.width_step) >= 1 - search.max_width_pruning - 1e-9:
        v = int(size * r + 1e-6) // divisor * divisor  # 5120 x 0.65 is 3327.999... in floating point
        if v >= lowest and v > 0:
            out.add(v)
        k += 1
    return sorted(out, reverse=True)


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def _moe_options(arch: ModelArch, search, skip: set, tp: int, ep: int) -> list[dict]:
    """The MoE fields of every candidate ([{}] for a dense model): experts (a multiple of EP, at least the
    router's top-k), each expert's FFN and the shared expert's (multiples of lcm(8, TP))."""
    if not arch.is_moe:
        return [{}]
    experts = [arch.num_moe_experts] if "num_moe_experts" in skip else \
        [e for e in _width_values(arch.num_moe_experts, search, ep) if e >= arch.moe_router_topk]
    div = _lcm(_ALIGN, tp)
    ffn = [arch.moe_ffn_hidden_size] if "moe_ffn_hidden_size" in skip else \
        [f for f in _width_values(arch.moe_ffn_hidden_size, search, div) if f % tp == 0]
    src = arch.moe_shared_expert_intermediate_size
    shared = [src] if not src or "moe_shared_expert_intermediate_size" in skip else \
        [f for f in _width_values(src, search, div) if f % tp == 0]
    out = []
    for e, f, fs in itertools.product(experts, ffn, shared):
        d = dict(num_moe_experts=e, moe_ffn_hidden_size=f, moe_shared_expert_intermediate_size=fs)
        if arch.family == "mixtral":  # Mixtral's intermediate_size is the experts' width (as target_shape)
            d["ffn_hidden_size"] = f
        out.append(d)
    return out


def _inputs(a: ModelArch) -> tuple[int, ...]:
    """Every linear's input width (2:4 sparsity needs them divisible by 4)."""
    ffn = (a.moe_ffn_hidden_size, a.moe_shared_expert_intermediate_size or 0) if a.is_moe else (a.ffn_hidden_size,)
    return (a.hidden_size, a.num_attention_heads * a.kv_channels, *ffn)


def _order(a: ModelArch) -> tuple:
    return (-a.num_params(), -a.num_layers, -a.hidden_size, -a.num_attention_heads, -(a.num_moe_experts or 0),
            -(a.moe_ffn_hidden_size or 0), -(a.moe_shared_expert_intermediate_size or 0))


def enumerate_shapes(arch: ModelArch, search, *, tps: tuple[int, ...] = (1,), pp: int = 1, ep: int = 1,
                     input_multiple: int = 1) -> list[ModelArch]:
    """Every valid shape of the search space (query groups kept; heads pruned inside groups), valid at
    every TP size in `tps` with `pp` pipeline stages and `ep` expert-parallel ranks, exportable to HF
    (transformers wants hidden % heads == 0 for the Llama family), and with every linear's input dimension
    a multiple of `input_multiple` (4 for 2:4 sparsity), largest first."""
    skip = set(search.hparams_to_skip)
    tp = max(_lcm(a, b) for a in tps for b in tps)
    L = arch.num_layers
    lowest_depth = max(1, math.ceil(L * (1 - search.max_depth_pruning)))
    layers = [L] if "num_layers" in skip else list(range(L, lowest_depth - 1, -1))
    g, n = arch.num_query_groups, arch.heads_per_group
    per_group = [n] if "num_attention_heads" in skip else \
        list(range(n, max(1, math.ceil(n * (1 - search.max_width_pruning))) - 1, -1))
    heads_opts = [g * k for k in per_group if (g * k) % tp == 0]
    # an MoE model has no dense MLP: its FFN axes are the experts' (_moe_options)
    ffn = [arch.ffn_hidden_size] if "ffn_hidden_size" in skip or arch.is_moe else \
        _width_values(arch.ffn_hidden_size, search, _lcm(_ALIGN, tp))
    ffn = [f for f in ffn if f % tp == 0 or arch.is_moe]
    moe = _moe_options(arch, search, skip, tp, ep)
    shapes = []
    for heads in heads_opts:
        # transformers needs hidden % heads == 0 (Llama family); lcm(8, 9 heads) = 72 would be too coarse
        divisor = _ALIGN if arch.family == "nemotron" else heads
        hidden = [arch.hidden_size] if "hidden_size" in skip else _width_values(arch.hidden_size, search, divisor)
        if arch.family != "nemotron":
            hidden = [h for h in hidden if h % heads == 0]
        for h, f, nl, m in itertools.product(hidden, ffn, layers, moe):
            shape = replace(arch, **{"num_layers": nl, "hidden_size": h, "ffn_hidden_size": f,
                                     "num_attention_heads": heads, **m})
            if any(d % input_multiple for d in _inputs(shape)):
                continue
            try:
                for t in tps:
                    check_parallel_layout(shape, t, pp, ep)
            except MegaslimError:
                continue
            shapes.append(shape)
    shapes.sort(key=_order)
    return shapes


def candidates(arch: ModelArch, budget: float | Budget, search, *, tps: tuple[int, ...] = (1,), pp: int = 1,
               ep: int = 1, input_multiple: int = 1) -> list[ModelArch]:
    """The `top_k` shapes within `budget` (a Budget, or a number of parameters) nearest to it; clear errors
    for budgets outside what the search space can reach."""
    b = budget if isinstance(budget, Budget) else Budget(float(budget))
    source = b.count(arch)
    if b.value >= source:
        raise MegaslimError(f"{b.key}={b.value:,.0f} is not below the source model's "
                            f"{source:,} {b.noun}: nothing to prune")
    shapes = enumerate_shapes(arch, search, tps=tps, pp=pp, ep=ep, input_multiple=input_multiple)
    if not shapes:
        sparse = f" with inputs divisible by {input_multiple} (2:4 sparsity)" if input_multiple > 1 else ""
        experts = f", EP {ep}" if ep > 1 else ""
        raise MegaslimError(f"prune.search allows no shape valid at TP {tps}, PP {pp}{experts}{sparse}")
    counted = [(b.count(s), s) for s in shapes]
    fit = [(c, s) for c, s in counted if c <= b.value]
    if not fit:
        c, smallest = min(counted, key=lambda cs: cs[0])
        raise MegaslimError(
            f"{b.key}={b.value:,.0f} is below the smallest shape the search allows "
            f"({c:,} {b.noun}: {describe(smallest)}, with max_width_pruning="
            f"{search.max_width_pruning}, max_depth_pruning={search.max_depth_pruning}); raise the budget or "
            "those limits, or give the shape in prune.export_config")
    fit.sort(key=lambda cs: -cs[0])  # stable: equal counts keep the enumeration's order (more total first)
    return [s for _, s in fit[:search.top_k]]


def describe(a: ModelArch) -> str:
    if a.is_moe:
        ffn = f"{a.num_moe_experts} experts (top-{a.moe_router_topk}) x ffn {a.moe_ffn_hidden_size}" + (
            f", shared ffn {a.moe_shared_expert_intermediate_size}" if a.moe_shared_expert_intermediate_size else "")
    else:
        ffn = f"ffn {a.ffn_hidden_size}"
    return (f"layers {a.num_layers}, hidden {a.hidden_size}, {ffn}, "
            f"heads {a.num_attention_heads}/{a.num_query_groups} groups")


@dataclass
class Ranked:
    arch: ModelArch
    pruned_loss: float
    trained_loss: Optional[float]
    seconds: float

    @property
    def loss(self) -> float:
        return self.pruned_loss if self.trained_loss is None else self.trained_loss

    def to_dict(self) -> dict:
        a = self.arch
        moe = {**{k: getattr(a, k) for k in MOE_AXES}, "active_params": a.num_active_params()} if a.is_moe else {}
        return {**{k: getattr(a, k) for k in AXES + ("num_query_groups",)}, **moe,
                "params": a.num_params(), "pruned_loss": self.pruned_loss,
                "trained_loss": self.trained_loss, "seconds": self.seconds}


def rank(cfg, model, arch: ModelArch, shapes: list[ModelArch], scores, eval_rows, *,
         train: Optional[Train] = None) -> list[Ranked]:
    """Prune every candidate from `scores` (in memory, PP=1), evaluate it, optionally give it
    `train(student, student_arch, i)` (the command's short distillation; returns the held-out loss after);
    best (lowest held-out loss) first."""
    p = cfg.prune
    out = []
    for i, shape in enumerate(tqdm(shapes, desc="search", disable=not report.is_rank0(), dynamic_ncols=True)):
        t0 = time.time()
        plan = build_plan(arch, shape, scores, layer_metric=p.layer_metric, contiguous=p.drop_contiguous,
                          fold_heads=p.fold_heads and p.fold_mode, expert_metric=p.expert_metric)
        student = student_from_plan(model, plan, cfg.model)
        pruned = evaluate_rows(student, eval_rows, vocab_size=arch.vocab_size,
                               micro_batch_size=cfg.data.micro_batch_size)["loss"]
        trained = None if train is None else train(student, plan.target_arch, i)
        model.eval()  # the short distillation may have switched the teacher to train mode
        out.append(Ranked(plan.target_arch, pruned, trained, time.time() - t0))
        del student
    return sorted(out, key=lambda r: (r.loss, -r.arch.num_params()))


def table(ranked: list[Ranked], budget: float | Budget, iters: int) -> None:
    """The ranking, printed on rank 0 (an MoE's expert axes and active parameters beside the others)."""
    if not report.is_rank0():
        return
    b = budget if isinstance(budget, Budget) else Budget(float(budget))
    moe = any(r.arch.is_moe for r in ranked)
    t = Table(title=f"megaslim prune: shapes within {b.value / 1e6:.2f}M {b.noun}, best held-out loss first")
    cols = ["#", "layers", "hidden", "experts x ffn" if moe else "ffn", "heads", "params"] + (["active"] if moe else [])
    for col in cols + ["pruned", f"+{iters} steps" if iters else "-", "s"]:
        t.add_column(col, no_wrap=True)
    for i, r in enumerate(ranked, 1):
        a = r.arch
        ffn = (f"{a.num_moe_experts} x {a.moe_ffn_hidden_size}" + (f" +{a.moe_shared_expert_intermediate_size}"
               if a.moe_shared_expert_intermediate_size else "")) if a.is_moe else str(a.ffn_hidden_size)
        active = [f"{a.num_active_params() / 1e6:.2f}M"] if moe else []
        t.add_row(str(i), str(a.num_layers), str(a.hidden_size), ffn,
                  f"{a.num_attention_heads}/{a.num_query_groups}", f"{a.num_params() / 1e6:.2f}M", *active,
                  f"{r.pruned_loss:.4f}", f"{r.trained_loss:.4f}" if r.trained_loss is not None else "-",
                  f"{r.seconds:.0f}")
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough that no column is cut
        console = Console(width=160)
    console.print(t)

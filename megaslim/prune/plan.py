"""`PrunePlan`: what to keep in each dimension (global indices, original order) + the pruned shape.

A plan is plain JSON: it can be reviewed, saved, and applied to any checkpoint of the same model at
any TP/PP. It is built from importance scores and a target shape, or from an explicit layer list.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from megaslim.config import FoldMode
from megaslim.errors import MegaslimError
from megaslim.importance.scores import ImportanceScores
from megaslim.io import atomic_write_text
from megaslim.model.arch import ModelArch
from megaslim.prune.depth import JOINT, block_loss_keep, check_depth_request, greedy_keep
from megaslim.prune.experts import choose_experts, moe_target

FOLD_MODES = tuple(FoldMode.values())
DEFAULT_FOLD_MODE = FoldMode.proj_sum.value  # as the config's prune.fold_mode (measured best, docs/pruning.md)


@dataclass
class PrunePlan:
    source: dict  # ModelArch.to_dict() of the model the plan applies to
    target: dict  # ModelArch.to_dict() of the pruned model
    keep_layers: list[int]  # source layer indices, ascending
    keep_channels: list[int]  # hidden channels, ascending
    keep_groups: dict[int, list[int]]  # source layer -> kept query groups, ascending
    keep_heads: dict[int, list[int]]  # source layer -> kept heads (global head index g*n + j), ascending
    keep_neurons: dict[int, list[int]]  # source layer -> kept MLP neurons, ascending
    # Head folding (prune.fold_heads; see slicing.fold_tensor): source layer -> {kept head: [pruned heads of
    # the same query group folded into it]}, global head indices. Empty: no folding.
    fold_heads: dict[int, dict[int, list[int]]] = field(default_factory=dict)
    # proj_sum: W_k += sum_p W_p on proj columns | laco: W_k += sum_p (W_p - W_k) on q rows and proj columns
    fold_mode: str = DEFAULT_FOLD_MODE
    # Mixtures of experts (megaslim.prune.experts): source layer -> kept routed experts, ascending; source
    # layer -> {kept source expert: its kept neurons}. Empty: a dense model (or a plan written before MoE).
    keep_experts: dict[int, list[int]] = field(default_factory=dict)
    keep_expert_neurons: dict[int, dict[int, list[int]]] = field(default_factory=dict)
    keep_shared_neurons: dict[int, list[int]] = field(default_factory=dict)  # source layer -> kept; empty: all

    @property
    def source_arch(self) -> ModelArch:
        return ModelArch.from_dict(self.source)

    @property
    def target_arch(self) -> ModelArch:
        return ModelArch.from_dict(self.target)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PrunePlan":
        d = json.loads(text)
        for k in ("keep_groups", "keep_heads", "keep_neurons"):
            d[k] = {int(layer): v for layer, v in d[k].items()}
        d["fold_heads"] = {int(layer): {int(k): v for k, v in m.items()}
                           for layer, m in d.get("fold_heads", {}).items()}
        d.setdefault("fold_mode", "laco")  # plans written before the key existed folded the laco way
        for k in ("keep_experts", "keep_shared_neurons"):
            d[k] = {int(layer): v for layer, v in d.get(k, {}).items()}
        d["keep_expert_neurons"] = {int(layer): {int(e): v for e, v in m.items()}
                                    for layer, m in d.get("keep_expert_neurons", {}).items()}
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        """The plan saved at `path` (prune.plan_path); missing, unreadable or malformed: one MegaslimError."""
        p = Path(path)
        if not p.is_file():
            what = "is a directory, not a prune_plan.json" if p.is_dir() else "not found"
            raise MegaslimError(f"prune plan {p} {what} (prune.plan_path: the prune_plan.json of launch/prune.py)")
        try:
            plan = cls.from_json(p.read_text(encoding="utf-8"))
            plan.target_arch  # noqa: B018 - a plan whose shapes do not parse is refused here, not mid-run
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}" if str(err) else type(err).__name__
            raise MegaslimError(f"prune plan {p} is not a prune_plan.json of launch/prune.py ({reason}); "
                                "fix prune.plan_path") from None
        return plan

    def check_applies_to(self, arch: ModelArch) -> None:
        if arch.to_dict() != self.source:
            diff = {k: (v, arch.to_dict().get(k)) for k, v in self.source.items() if arch.to_dict().get(k) != v}
            raise MegaslimError(f"the prune plan was made for another model: {diff} (plan vs model)")


def _topk_sorted(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, returned in original (ascending) order; ties -> lower index."""
    order = torch.argsort(-scores.double(), stable=True)
    return sorted(order[:k].tolist())


def target_shape(arch: ModelArch, export_config, *, tp: int, hf_export: bool) -> ModelArch:
    """The pruned ModelArch, with every target checked (<= source, > 0, divisible) before any compute."""
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
    want = {k: getattr(arch, k) if getattr(export_config, k) is None else getattr(export_config, k) for k in keys}
    problems = []
    for k, v in want.items():
        src = getattr(arch, k)
        if v <= 0:
            problems.append(f"prune.export_config.{k}={v} must be > 0")
        elif v > src:
            problems.append(f"prune.export_config.{k}={v} is larger than the source's {src}")
    if problems:
        raise MegaslimError("; ".join(problems))
    heads, groups = want["num_attention_heads"], want["num_query_groups"]
    if heads % groups:
        raise MegaslimError(f"num_attention_heads={heads} is not a multiple of num_query_groups={groups}")
    if heads // groups > arch.heads_per_group:
        raise MegaslimError(
            f"{heads} heads in {groups} groups needs {heads // groups} heads per group; the source has "
            f"{arch.heads_per_group} (heads are pruned inside groups). Valid head counts for {groups} groups: "
            f"{[groups * n for n in range(1, arch.heads_per_group + 1)]}")
    if groups < tp:
        raise MegaslimError(f"num_query_groups={groups} < TP={tp}: megatron would shard through a group")
    for k in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if want[k] % tp:
            raise MegaslimError(f"prune.export_config.{k}={want[k]} is not divisible by TP={tp}; nearest valid: "
                                f"{_nearest(want[k], tp, getattr(arch, k))}")
    # transformers 5 checks hidden % heads for Llama-family configs (not for Nemotron's)
    if hf_export and arch.family != "nemotron" and want["hidden_size"] % heads:
        raise MegaslimError(
            f"transformers refuses hidden_size={want['hidden_size']} with num_attention_heads={heads} "
            f"(hidden must be a multiple of heads) and export.hf_dir is set; nearest valid hidden sizes: "
            f"{_nearest(want['hidden_size'], heads, arch.hidden_size)}")
    return replace(arch, **{**want, **moe_target(arch, export_config, tp=tp)})


def _nearest(value: int, multiple: int, upper: int) -> list[int]:
    lo = (value // multiple) * multiple
    return [v for v in (lo, lo + multiple) if 0 < v <= upper]


def choose_layers(scores: Optional[ImportanceScores], arch: ModelArch, num_layers: int, *,
                  drop_layers: list[int], metric: str, contiguous: bool, blocks: int = 1) -> list[int]:
    """The kept source layers: all but drop_layers, or the `num_layers` chosen by `metric`."""
    L = arch.num_layers
    if drop_layers:
        bad = [i for i in drop_layers if not 0 <= i < L]
        if bad:
            raise MegaslimError(f"prune.drop_layers {bad} out of range [0, {L})")
        keep = [i for i in range(L) if i not in set(drop_layers)]
        if not keep:
            raise MegaslimError("prune.drop_layers would drop every layer")
        return keep
    if num_layers == L:
        return list(range(L))
    if scores is None:
        raise MegaslimError("depth pruning by importance needs scores")
    if metric in JOINT:
        check_depth_request(L, num_layers, metric=metric, blocks=blocks, contiguous=contiguous)
        return (block_loss_keep(scores, L, num_layers, blocks) if metric == "block_loss"
                else greedy_keep(scores, L, num_layers))
    imp = scores.layer_loss if metric == "loss" else scores.layer_bi
    if imp is None:
        raise MegaslimError("prune.layer_metric=loss needs importance.layer_metrics to include loss")
    n_drop = L - num_layers
    if contiguous:  # the block of n_drop consecutive layers with the least total importance
        sums = [imp[i:i + n_drop].sum().item() for i in range(L - n_drop + 1)]
        start = min(range(len(sums)), key=lambda i: (sums[i], i))
        return [i for i in range(L) if not start <= i < start + n_drop]
    return _topk_sorted(imp, num_layers)


def fold_assignment(head_scores: torch.Tensor, groups: list[int], heads: list[int], n: int) -> dict[int, list[int]]:
    """Which kept head receives which pruned heads, inside each kept query group (pruned whole groups are
    not folded). Mirror pairing around the cut (our choice; the paper does not pin it down): the most
    important pruned head goes to the least important kept head, the next one to the next-least important
    kept head, wrapping around when a group prunes more heads than it keeps."""
    out: dict[int, list[int]] = {}
    kept = set(heads)
    for g in groups:
        members = sorted(range(g * n, (g + 1) * n), key=lambda h: (-float(head_scores[h]), h))
        keep = [h for h in members if h in kept]  # most important first
        pruned = [h for h in members if h not in kept]
        for i, p in enumerate(pruned):
            out.setdefault(keep[len(keep) - 1 - i % len(keep)], []).append(p)
    return {k: sorted(v) for k, v in sorted(out.items())}


def build_plan(arch: ModelArch, target: ModelArch, scores: Optional[ImportanceScores], *,
               drop_layers: list[int] = (), layer_metric: str = "bi", contiguous: bool = False,
               fold_heads: bool | str = False, layer_blocks: int = 1, expert_metric: str = "reap") -> PrunePlan:
    """fold_heads: False (no folding), a mode of FOLD_MODES, or True (= "laco", what a bare True meant
    before proj_sum existed); see slicing.fold_tensor. layer_blocks: block_loss's most blocks."""
    fold_mode = "laco" if fold_heads is True else str(fold_heads or DEFAULT_FOLD_MODE)  # a FoldMode: its value
    if fold_mode not in FOLD_MODES:
        raise MegaslimError(f"unknown head folding mode {fold_heads!r}; one of {FOLD_MODES}")
    keep_layers = choose_layers(scores, arch, target.num_layers, drop_layers=list(drop_layers),
                                metric=layer_metric, contiguous=contiguous, blocks=layer_blocks)
    target = replace(target, num_layers=len(keep_layers))
    width_cut = (target.hidden_size, target.ffn_hidden_size, target.num_attention_heads, target.num_query_groups) != \
        (arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads, arch.num_query_groups)
    if width_cut and scores is None:
        raise MegaslimError("width pruning needs importance scores")
    n_src, n_dst = arch.heads_per_group, target.heads_per_group
    keep_groups, keep_heads, keep_neurons, folds = {}, {}, {}, {}
    for layer in keep_layers:
        if scores is None:
            keep_groups[layer] = list(range(arch.num_query_groups))
            keep_heads[layer] = list(range(arch.num_attention_heads))
            keep_neurons[layer] = list(range(arch.ffn_hidden_size))
            continue
        groups = _topk_sorted(scores.query_groups[layer], target.num_query_groups)
        head_scores = scores.heads[layer].reshape(arch.num_query_groups, n_src)
        heads = [g * n_src + j for g in groups for j in _topk_sorted(head_scores[g], n_dst)]
        keep_groups[layer], keep_heads[layer] = groups, heads
        if fold_heads and n_dst < n_src:
            folds[layer] = fold_assignment(scores.heads[layer], groups, heads, n_src)
        keep_neurons[layer] = _topk_sorted(scores.neurons[layer], target.ffn_hidden_size)
    channels = (list(range(arch.hidden_size)) if scores is None
                else _topk_sorted(scores.channels, target.hidden_size))
    experts, expert_neurons, shared = choose_experts(scores, arch, target, keep_layers, metric=str(expert_metric))
    return PrunePlan(source=arch.to_dict(), target=target.to_dict(), keep_layers=keep_layers,
                     keep_channels=channels, keep_groups=keep_groups, keep_heads=keep_heads,
                     keep_neurons=keep_neurons, fold_heads=folds, fold_mode=fold_mode,
                     keep_experts=experts, keep_expert_neurons=expert_neurons, keep_shared_neurons=shared)


def flops_per_token(arch: ModelArch, seq_length: int) -> int:
    """Forward FLOPs per token (2 x multiply-adds of every matmul incl. attention scores and logits). An MoE
    layer runs its router, the top-k routed experts and the shared expert (with its gate), not every expert."""
    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.kv_channels
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    mats = 3 if arch.gated else 2
    mlp = mats * h * f
    if arch.is_moe:
        shared = arch.moe_shared_expert_intermediate_size or 0
        mlp = (arch.num_moe_experts * h + arch.moe_router_topk * mats * h * arch.moe_ffn_hidden_size
               + mats * h * shared + (h if arch.moe_shared_expert_gate else 0))
    per_layer = 2 * (h * (q + 2 * kv) + q * h + mlp) + 2 * 2 * seq_length * q
    return arch.num_layers * per_layer + 2 * h * arch.vocab_size

"""Which layers a joint depth metric drops, from its saved scores (block_loss, greedy_loss), and the checks
of a depth request that need the source's layer count."""
from __future__ import annotations

import math
from typing import Optional

import torch

from megaslim.errors import MegaslimError
from megaslim.importance.scores import ImportanceScores

JOINT = ("block_loss", "greedy_loss")


def check_depth_request(num_layers: int, keep: int, *, metric: str, blocks: int,
                        drop_layers: list[int] = (), contiguous: bool = False) -> None:
    """The depth settings against the source's `num_layers` (prune keeps `keep`), before any compute."""
    if blocks < 1:
        raise MegaslimError(f"prune.layer_blocks={blocks} must be >= 1")
    if metric not in JOINT:
        return
    if drop_layers:
        raise MegaslimError(f"prune.layer_metric={metric} chooses the layers to drop; unset prune.drop_layers "
                            "(or use prune.layer_metric=bi with the explicit list)")
    if contiguous:
        raise MegaslimError(f"prune.drop_contiguous picks a block by BI; prune.layer_metric={metric} chooses "
                            "by loss (block_loss: contiguous blocks already): unset prune.drop_contiguous")
    drop = num_layers - keep
    if drop < 1:
        raise MegaslimError(f"prune.layer_metric={metric} needs layers to drop: prune.export_config.num_layers"
                            f"={keep} of {num_layers}")
    if blocks > drop:
        raise MegaslimError(f"prune.layer_blocks={blocks} is more blocks than the {drop} layers to drop")


def best_blocks(scores: torch.Tensor, drop: int, blocks: int) -> list[tuple[int, int]]:
    """The set of at most `blocks` disjoint, non-adjacent blocks (start, size) whose sizes sum to `drop`
    with the least total score; `scores[s-1, i]` scores the block of size s at start i (inf or NaN: not
    a candidate). blocks=1 is exact; more blocks add their single-block scores (an approximation: the
    blocks' effects compound). Ties -> the earliest blocks."""
    k, L = scores.shape
    cost = torch.where(torch.isnan(scores), torch.full_like(scores, math.inf), scores.double())
    inf = math.inf
    # best[i][d][b]: least cost over layers i.. with d layers still to drop in at most b blocks; layer i free
    best = [[[inf] * (blocks + 1) for _ in range(drop + 1)] for _ in range(L + 2)]
    pick: dict[tuple[int, int, int], Optional[int]] = {}
    for i in range(L + 1, -1, -1):
        for d in range(drop + 1):
            for b in range(blocks + 1):
                if d == 0:
                    best[i][d][b] = 0.0
                    continue
                if i >= L or b == 0:
                    continue
                options = [(best[i + 1][d][b], None)]  # keep layer i
                for s in range(1, min(d, L - i) + 1):  # a block of size s at i, then a kept layer
                    c = cost[s - 1, i].item() if s <= k else inf
                    options.append((c + best[min(i + s + 1, L + 1)][d - s][b - 1], s))
                best[i][d][b], pick[(i, d, b)] = min(options, key=lambda o: (o[0], o[1] is None))
    if best[0][drop][blocks] == inf:
        raise MegaslimError(f"the block_loss scores hold no set of {blocks} block(s) dropping {drop} layers")
    out, i, d, b = [], 0, drop, blocks
    while d > 0:
        s = pick[(i, d, b)]
        if s is None:
            i += 1
            continue
        out.append((i, s))
        i, d, b = i + s + 1, d - s, b - 1
    return out


def block_loss_keep(scores: ImportanceScores, num_layers: int, keep: int, blocks: int) -> list[int]:
    """Kept layers under block_loss: the best set of blocks of the saved scan for k = num_layers - keep."""
    m, drop = scores.layer_block_loss, num_layers - keep
    if m is None:
        raise MegaslimError("prune.layer_metric=block_loss needs block_loss scores: compute them (no "
                            "importance.scores_path) or pass a scores file computed with it")
    made = scores.settings.get("block_drop", m.shape[0])
    made_blocks = scores.settings.get("layer_blocks", 1)
    if not (drop == made and blocks == 1 or made_blocks > 1 and drop <= made):  # the rows the scan filled
        raise MegaslimError(f"the block_loss scores were computed for dropping {made} layers in up to "
                            f"{made_blocks} block(s); this prune drops {drop} in up to {blocks}: recompute them")
    dropped = {i + j for i, s in best_blocks(m, drop, blocks) for j in range(s)}
    return [i for i in range(num_layers) if i not in dropped]


def greedy_keep(scores: ImportanceScores, num_layers: int, keep: int) -> list[int]:
    """Kept layers under greedy_loss: all but the first k removed by the saved greedy order."""
    order, drop = scores.layer_greedy, num_layers - keep
    if order is None:
        raise MegaslimError("prune.layer_metric=greedy_loss needs the greedy removal order: compute it (no "
                            "importance.scores_path) or pass a scores file computed with it")
    removed = int(torch.isfinite(order).sum())
    if removed < drop:
        raise MegaslimError(f"the greedy_loss order removes {removed} layers; this prune drops {drop}: recompute it")
    dropped = set(torch.argsort(order.double(), stable=True)[:drop].tolist())
    return [i for i in range(num_layers) if i not in dropped]


def depth_kwargs(prune_cfg, layer_metrics, num_layers: int, keep: Optional[int]) -> dict:
    """compute_importance's joint-depth arguments for a prune keeping `keep` of `num_layers` layers
    (None: prune.export_config.num_layers, or no depth cut), checked first."""
    keep = prune_cfg.export_config.num_layers if keep is None else keep
    metric = str(prune_cfg.layer_metric)
    scan = metric in JOINT or "block_loss" in [str(m) for m in layer_metrics]
    if not scan or keep is None or keep >= num_layers:
        if metric in JOINT:
            check_depth_request(num_layers, num_layers if keep is None else keep, metric=metric,
                                blocks=prune_cfg.layer_blocks)
        return {}
    check_depth_request(num_layers, keep, metric=metric, blocks=prune_cfg.layer_blocks,
                        drop_layers=list(prune_cfg.drop_layers), contiguous=prune_cfg.drop_contiguous)
    return {"depth_metric": metric if metric in JOINT else None, "layer_drop": num_layers - keep,
            "layer_blocks": prune_cfg.layer_blocks}

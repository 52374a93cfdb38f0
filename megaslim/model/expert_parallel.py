"""Expert-parallel naming: each EP rank holds whole experts `local_experts.{0..n-1}`; megaslim names them
by their global index (EP rank * n + local index), as it names layers by their global number."""
from __future__ import annotations

import math
import re
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megaslim.model.forward import make_microbatches

_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)\.")


def expert_index(name: str) -> Optional[int]:
    """The expert number in parameter `name`, or None for a parameter outside the routed experts."""
    m = _EXPERT.search(name)
    return int(m.group(2)) if m else None


def renumber(name: str, offset: int) -> str:
    """`name` with its expert number shifted by `offset` (local -> global with +offset, back with -offset)."""
    if not offset:
        return name
    return _EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}.", name, count=1)


def _ep() -> tuple[int, int]:
    """(EP size, EP rank) of the live process groups; (1, 0) without them."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, 0
    return ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()


def local_offset(num_experts: Optional[int]) -> int:
    """Global index of this EP rank's first expert (0 for a dense model or EP=1)."""
    if not num_experts:
        return 0
    ep, rank = _ep()
    return rank * (num_experts // ep)


def gather_experts(state: dict[str, torch.Tensor], num_experts: Optional[int]) -> dict[str, torch.Tensor]:
    """This stage's full state (local expert names) -> every EP rank's experts under global names.
    A collective over the EP group (a no-op at EP=1 or for a dense model)."""
    offset = local_offset(num_experts)
    out = {renumber(k, offset) if expert_index(k) is not None else k: v for k, v in state.items()}
    ep, _ = _ep()
    if ep == 1:
        return out
    from megatron.core import parallel_state as ps

    mine = {k: v for k, v in out.items() if expert_index(k) is not None}
    parts: list = [None] * ep
    dist.all_gather_object(parts, mine, group=ps.get_expert_model_parallel_group())
    for part in parts:
        out.update(part)
    return out


def global_fetch(fetch: Callable[[str], torch.Tensor], num_experts: Optional[int]) -> Callable[[str], torch.Tensor]:
    """`fetch` by global name, for `load_full_state` (which asks by this rank's local expert names)."""
    def by_global_name(name: str) -> torch.Tensor:
        return fetch(renumber(name, local_offset(num_experts)))

    return by_global_name


def pad_for_expert_parallel(batches: list[dict], rows: torch.Tensor, dp: int, micro_batch_size: int) -> list[dict]:
    """Under expert parallelism every rank of an EP group joins each MoE layer's token exchange, so all DP
    ranks must run as many micro-batches: add fully masked ones (their tokens count nowhere) to a rank whose
    share of the calibration `rows` is shorter, or empty. Unchanged without EP."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_expert_model_parallel_world_size() == 1:
        return batches
    need = math.ceil(math.ceil(rows.shape[0] / dp) / micro_batch_size)  # micro-batches of the largest share
    template = batches[0] if batches else make_microbatches(rows[:1], micro_batch_size)[0]
    masked = dict(template, loss_mask=torch.zeros_like(template["loss_mask"]))
    return batches + [masked] * (need - len(batches))

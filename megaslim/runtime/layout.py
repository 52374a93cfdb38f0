"""The parallel layout (TP, PP, DP, EP and the prune targets): the one place that knows how ranks split
the work. Built from the config and the launcher's world size before any process group exists, so a
layout error is the first thing a user sees; its collective helpers work once groups are up."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megaslim.errors import MegaslimError


def launcher_world_size() -> int:
    """Processes launched for this job (torchrun's WORLD_SIZE; 1 when run as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_layout(world_size: int, tp: int, pp: int, ep: int = 1) -> int:
    """Data-parallel size, or a clear error if the world does not factor as tp * pp * dp with the
    expert-parallel size `ep` dividing dp (megatron carves EP groups out of the data-parallel ranks)."""
    if tp < 1 or pp < 1 or ep < 1:
        raise MegaslimError(f"tensor/pipeline/expert parallel sizes must be >= 1 (got TP={tp}, PP={pp}, EP={ep})")
    if world_size % (tp * pp):
        raise MegaslimError(
            f"world size {world_size} is not divisible by TP*PP = {tp}*{pp}; "
            f"launch with --nproc-per-node a multiple of {tp * pp}"
        )
    dp = world_size // (tp * pp)
    if dp % ep:
        raise MegaslimError(
            f"expert parallel size EP={ep} does not divide the data-parallel size {dp} (world {world_size} / "
            f"(TP*PP = {tp}*{pp})); launch with --nproc-per-node a multiple of {tp * pp * ep}")
    return dp


def sequence_parallel_applies(requested: bool, tp: int) -> bool:
    """parallel.sequence_parallel as it applies: at TP>1 only (Megatron-LM turns it off at TP=1, and
    megatron-core's TransformerConfig refuses it there). Models and layouts take it from here;
    the config's validation restates it (config/validate.py: sequence_parallel_on) without torch."""
    return bool(requested) and tp > 1


def device() -> torch.device:
    """Where collectives run: the current CUDA device, or the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int = 1
    tp: int = 1
    pp: int = 1
    dp: int = 1
    target_tp: Optional[int] = None  # the pruned checkpoint's layout (prune.target_*; None = same)
    target_pp: Optional[int] = None
    ep: int = 1  # expert parallel: whole experts split over ep of the dp ranks (1 for dense models)
    # parallel.sequence_parallel as it applies: only at TP>1 (Megatron-LM turns it off at TP=1). Only
    # distillation builds its models with it; prune, evaluate and the rest run without (docs/moe.md).
    sequence_parallel: bool = False

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, *, world_size: Optional[int] = None,
              target_tp: Optional[int] = None, target_pp: Optional[int] = None, ep: int = 1,
              sequence_parallel: bool = False) -> "ParallelLayout":
        world = launcher_world_size() if world_size is None else world_size
        return cls(world, tp, pp, check_layout(world, tp, pp, ep), target_tp, target_pp, ep,
                   sequence_parallel_applies(sequence_parallel, tp))

    @classmethod
    def from_config(cls, cfg, *, world_size: Optional[int] = None) -> "ParallelLayout":
        par = cfg.parallel
        return cls.build(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                         world_size=world_size, target_tp=cfg.prune.target_tensor_model_parallel_size,
                         target_pp=cfg.prune.target_pipeline_model_parallel_size,
                         ep=getattr(par, "expert_model_parallel_size", 1),
                         sequence_parallel=getattr(par, "sequence_parallel", False))

    @classmethod
    def from_groups(cls) -> "ParallelLayout":
        """The layout the live process groups form (the prune targets once a run switched to them);
        all ones when model parallelism is not initialized. For libraries that run on the current groups.
        sequence_parallel is a property of built models (their config), not of the groups: False here."""
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return cls()
        return cls(dist.get_world_size(), ps.get_tensor_model_parallel_world_size(),
                   ps.get_pipeline_model_parallel_world_size(), ps.get_data_parallel_world_size(),
                   ep=ps.get_expert_model_parallel_world_size())

    @property
    def target_dp(self) -> int:
        """Data-parallel size at the prune targets' layout (the current one where a target is unset)."""
        return self.world_size // ((self.target_tp or self.tp) * (self.target_pp or self.pp))

    def check_global_batch(self, global_batch_size: int, micro_batch_size: int) -> int:
        """Micro-batches per step per DP rank, or a clear error when the global batch does not split."""
        if global_batch_size % (micro_batch_size * self.dp):
            raise MegaslimError(f"train.global_batch_size={global_batch_size} is not a multiple of "
                                f"train.micro_batch_size * DP = {micro_batch_size} * {self.dp}")
        return global_batch_size // (micro_batch_size * self.dp)

    # -- ranks (process groups must exist) -------------------------------------------------------
    @staticmethod
    def dp_rank() -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank() if ps.model_parallel_is_initialized() else 0

    @staticmethod
    def tp_rank() -> int:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0

    @staticmethod
    def is_writer() -> bool:
        """The one rank that writes shared files (JSON, plots, tables): global rank 0."""
        return not dist.is_initialized() or dist.get_rank() == 0

    # -- data ------------------------------------------------------------------------------------
    def shard_rows(self, rows, dp_rank: Optional[int] = None):
        """This DP rank's rows of a full [n, ...] set: rows r, r + dp, r + 2 dp, ..."""
        r = self.dp_rank() if dp_rank is None else dp_rank
        return rows[r::self.dp]

    # -- collectives -----------------------------------------------------------------------------
    @staticmethod
    def all_reduce(t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """All-reduce a (possibly CPU) tensor on the collective device; returns a CPU tensor."""
        t = t.to(device())
        dist.all_reduce(t, op=op, group=group)
        return t.cpu()

    @staticmethod
    def tp_gather_parts(t: torch.Tensor, *, cpu: bool = True) -> list[torch.Tensor]:
        """Every TP rank's copy of `t`, in TP rank order: CPU tensors, or (`cpu=False`) on the
        collective device, for callers that keep computing there. `[t]` itself at TP=1."""
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        return [t] if tp == 1 else ParallelLayout.gather_parts(t, ps.get_tensor_model_parallel_group(), cpu=cpu)

    @staticmethod
    def gather_parts(t: torch.Tensor, group, *, cpu: bool = True) -> list[torch.Tensor]:
        """Every rank's copy of `t` over `group`, in group rank order (see tp_gather_parts)."""
        t = t.to(device()).contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t, group=group)
        return [p.cpu() for p in parts] if cpu else parts

    @classmethod
    def tp_gather(cls, t: torch.Tensor, dim: int = 0, *, cpu: bool = True) -> torch.Tensor:
        """Concatenate each TP rank's contiguous block along `dim` in TP rank order."""
        parts = cls.tp_gather_parts(t, cpu=cpu)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

"""The one way a teacher plus a plan becomes a student: used by the prune command, distillation's
on-the-fly student, iterative pruning and the shape search."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megaslim.config import ModelConfig
from megaslim.prune.apply import build_pruned, prune_in_memory, reinit_parallel, write_pruned_stage
from megaslim.prune.plan import PrunePlan
from megaslim.runtime.layout import ParallelLayout


def student_from_plan(teacher, plan: PrunePlan | list[PrunePlan], model_cfg: ModelConfig, *,
                      scratch: Optional[Path] = None, target_tp: Optional[int] = None,
                      target_pp: Optional[int] = None, seed: int = 1234, release_teacher: bool = False):
    """`teacher` pruned by `plan` (a list is applied in turn), in eval mode.

    scratch=None: in memory (needs PP=1; the layout stays). Otherwise each stage writes its pruned
    tensors under `scratch`, the layout switches to target TP/PP (None: unchanged) and the student
    is rebuilt there, reading only its own shard; `scratch` is removed afterwards.
    release_teacher (scratch only): free the teacher's weights once written, so teacher and student
    never sit in memory together; the caller must not use the teacher afterwards."""
    if scratch is None:
        return prune_in_memory(teacher, plan, model_cfg)
    write_pruned_stage(teacher, plan, scratch)
    if release_teacher:
        teacher.to_empty(device="meta")  # the caller still holds the module; its storage goes now
    if target_tp is not None or target_pp is not None:
        from megatron.core import parallel_state as ps

        reinit_parallel(target_tp or ps.get_tensor_model_parallel_world_size(),
                        target_pp or ps.get_pipeline_model_parallel_world_size(), seed)
    last = plan[-1] if isinstance(plan, (list, tuple)) else plan
    student = build_pruned(last, scratch, model_cfg)
    dist.barrier()  # every rank has read its shard before the scratch goes
    if ParallelLayout.is_writer():
        shutil.rmtree(scratch, ignore_errors=True)
    return student

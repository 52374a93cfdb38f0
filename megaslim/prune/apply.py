"""Apply a PrunePlan to a sharded model and rebuild the pruned model at any target TP/PP.

Each pipeline stage gathers its full tensors over TP, slices them, and writes them to a scratch
safetensors file; the pruned model is then built at the target layout and every rank reads only its
own shard back. Scratch files live under the output directory and are removed when done.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from megaslim.config import ModelConfig
from megaslim.model.arch import ModelArch
from megaslim.model.build import build_gpt
from megaslim.model.expert_parallel import gather_experts, global_fetch
from megaslim.model.state import gather_full_state, load_full_state
from megaslim.prune.plan import PrunePlan
from megaslim.prune.slicing import prune_state
from megaslim.runtime.layout import check_layout


def _first(plan: PrunePlan | list[PrunePlan]) -> PrunePlan:
    return plan[0] if isinstance(plan, (list, tuple)) else plan


def write_pruned_stage(model, plan: PrunePlan | list[PrunePlan], scratch: Path) -> None:
    """Collective: every rank of this stage joins the TP gather; one rank per stage writes.
    A list of plans (iterative pruning, PP=1) is applied in turn."""
    from megatron.core import parallel_state as ps

    if dist.get_rank() == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    dist.barrier()
    src = _first(plan).source_arch
    full = gather_experts(gather_full_state(model, src.vocab_size), src.num_moe_experts)  # over TP, then EP
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        pruned = prune_state(full, plan)
        save_file(pruned, str(scratch / f"stage-{ps.get_pipeline_model_parallel_rank():04d}.safetensors"))
    dist.barrier()


class ScratchReader:
    """Lazy access to the pruned full tensors of every stage."""

    def __init__(self, scratch: Path):
        self._files = [safe_open(str(f), "pt") for f in sorted(scratch.glob("stage-*.safetensors"))]
        self._where = {k: f for f in self._files for k in f.keys()}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._where and name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"  # tied: the last stage's copy of the embedding
        return self._where[name].get_tensor(name)


def reinit_parallel(tp: int, pp: int, seed: int) -> None:
    """Switch megatron's model-parallel layout inside a running job (same world)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ep = ps.get_expert_model_parallel_world_size()  # expert parallelism is kept across the switch
    check_layout(dist.get_world_size(), tp, pp, ep)
    if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) == (tp, pp):
        return
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_pruned(plan: PrunePlan, scratch: Path, model_cfg: ModelConfig):
    """The pruned model at the current layout, filled from the scratch files."""
    arch: ModelArch = plan.target_arch
    model = build_gpt(arch, model_cfg, init_weights=False)
    load_full_state(model, global_fetch(ScratchReader(scratch), arch.num_moe_experts))
    model.eval()
    return model


def prune_in_memory(model, plan: PrunePlan | list[PrunePlan], model_cfg: ModelConfig):
    """Pruned copy of `model` without scratch files (pipeline size 1 only: stages would reshape).
    A list of plans is applied in turn."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("prune_in_memory needs PP=1; use write_pruned_stage + build_pruned")
    src = _first(plan).source_arch
    pruned = prune_state(gather_experts(gather_full_state(model, src.vocab_size), src.num_moe_experts), plan)
    last = plan[-1] if isinstance(plan, (list, tuple)) else plan
    new = build_gpt(last.target_arch, model_cfg, init_weights=False)
    tied = "embedding.word_embeddings.weight"
    load_full_state(new, global_fetch(lambda n: pruned[n] if n in pruned else pruned[tied],
                                      last.target_arch.num_moe_experts))
    new.eval()
    return new

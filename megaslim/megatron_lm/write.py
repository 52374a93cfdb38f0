"""Write a model as a Megatron-LM checkpoint pretrain_gpt.py continues from: `iter_NNNNNNN/` (torch_dist: the
GPTModel's sharded `model` keys; common.pt with `args`, checkpoint_version, iteration) and
`latest_checkpointed_iteration.txt`, the way Megatron-LM's save_checkpoint lays them out, written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megaslim import checkpoint as ckpt
from megaslim import io as mio
from megaslim.errors import MegaslimError
from megaslim.megatron_lm.args import args_from_arch, pretrain_gpt_flags
from megaslim.megatron_lm.read import RELEASE, TOKENIZER, TRACKER
from megaslim.model.arch import ModelArch
from megaslim.runtime import ParallelLayout, rank0_print

CHECKPOINT_VERSION = 3.0  # what Megatron-LM's generate_state_dict writes
# save_checkpoint's content metadata for a torch_dist model without optimizer state
_CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def check_export_dir(root: Path, key: str = "export.megatron_dir") -> None:
    """New, empty (an interrupted export's `*.partial` aside), or a Megatron-LM root (tracker + iteration
    folders) that a new export may update."""
    if root.exists() and not root.is_dir():
        raise MegaslimError(f"{key}={root} is a file; a directory is expected")
    if not root.is_dir():
        return
    names = sorted(p.name for p in root.iterdir())
    foreign = [n for n in names if n not in (TRACKER, RELEASE) and not n.startswith("iter_")]
    untracked = not (root / TRACKER).is_file() and any(not n.endswith(".partial") for n in names)
    if foreign or untracked:
        raise MegaslimError(f"{key}={root} exists and is not a Megatron-LM checkpoint root "
                            f"(holds {(foreign or names)[:5]}); choose a new or empty folder")


def _padded_vocab(model) -> int:
    """Rows of the checkpoint's embedding (first stage) / output layer (last stage), known on every rank."""
    from megatron.core import parallel_state as ps

    tp, rows = ps.get_tensor_model_parallel_world_size(), 0
    embedding = getattr(model, "embedding", None)
    layer = embedding.word_embeddings if embedding is not None else getattr(model, "output_layer", None)
    if layer is not None:
        rows = layer.weight.shape[0] * tp
    return int(ParallelLayout.all_reduce(torch.tensor([rows]), op=dist.ReduceOp.MAX).item())


def export_megatron_lm(model, arch: ModelArch, out_dir: str | Path, *, iteration: int = 0,
                       divisible_by: int = 128, tokenizer_dir: Optional[str | Path] = None) -> Path:
    """Collective: this rank's shard of `model` into `out_dir/iter_{iteration:07d}/`; rank 0 then points the
    tracker at it. A killed export leaves only `iter_*.partial` (never a tracker naming a partial folder)."""
    from megatron.core import parallel_state as ps

    root = Path(out_dir).expanduser().absolute()
    check_export_dir(root)
    final = root / f"iter_{iteration:07d}"
    partial = final.with_name(final.name + ".partial")
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    padded = _padded_vocab(model)
    if -(-arch.vocab_size // (divisible_by * tp)) * divisible_by * tp != padded:
        divisible_by = padded // tp  # the one value that pads arch.vocab_size to these rows at this TP
    tok = final / TOKENIZER if tokenizer_dir is not None else None
    args = args_from_arch(arch, padded_vocab_size=padded, divisible_by=divisible_by, tp=tp, pp=pp,
                          world_size=dist.get_world_size(), params_dtype=model.config.params_dtype,
                          tokenizer_model=str(tok) if tok else None, iteration=iteration,
                          ep=ps.get_expert_model_parallel_world_size())
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
             "num_floating_point_operations_so_far": 0, "model": model.sharded_state_dict()}
    ckpt.save_sharded(state, root, partial, content_metadata=dict(_CONTENT_METADATA))
    if dist.get_rank() == 0:
        if tok is not None:
            _copy_tokenizer(Path(tokenizer_dir), partial / TOKENIZER)
        mio.fsync_dir(partial)
        mio.swap_dir(partial, final)
        mio.atomic_write(root / TRACKER, str(iteration), durable=True)  # Megatron-LM writes the bare number
    dist.barrier()
    rank0_print(f"Megatron-LM checkpoint {final}; continue with: pretrain_gpt.py --load {root} --finetune "
                + " ".join(pretrain_gpt_flags(args)))
    return root


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """The HF tokenizer files, so --tokenizer-model (in args) points inside the checkpoint."""
    from transformers import AutoTokenizer

    if not src.is_dir():
        raise MegaslimError(f"tokenizer {src}: no such directory")
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))

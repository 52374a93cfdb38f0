"""Find and read a Megatron-LM torch_dist checkpoint: the root with `latest_checkpointed_iteration.txt`, or
one `iter_NNNNNNN` / `release` folder whose common.pt carries Megatron-LM's saved `args` (or, written by
Megatron-Bridge, whose run_config.yaml describes the model)."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from megaslim import checkpoint as ckpt
from megaslim.errors import MegaslimError
from megaslim.megatron_lm import bridge
from megaslim.megatron_lm.args import arch_from_args, get
from megaslim.megatron_lm.unpickle import read_common
from megaslim.model.arch import ModelArch

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's get_checkpoint_tracker_filename
RELEASE = "release"
COMMON = "common.pt"
TOKENIZER = "tokenizer"  # megaslim's export copies the tokenizer here, inside the iteration folder
_ITER_RE = re.compile(r"^iter_\d{7}$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class MegatronLMCheckpoint:
    path: Path  # the iter_NNNNNNN / release folder that holds the torch_dist files
    iteration: Optional[int]  # None for `release`
    common: dict  # common.pt: args, checkpoint_version, iteration, ...
    args: argparse.Namespace  # Megatron-LM's saved args, or those Bridge's run_config.yaml amounts to


def looks_like(path: Path) -> bool:
    """A Megatron-LM tracker, or a torch_dist folder (common.pt + metadata.json) that is not megaslim's own
    (megaslim's folders hold megaslim.json; its roots a `latest` marker)."""
    if not path.is_dir() or ckpt.is_checkpoint(path):
        return False
    return (path / TRACKER).is_file() or (path / bridge.TRAIN_STATE_TRACKER).is_file() or (
        (path / COMMON).is_file() and (path / "metadata.json").is_file())


def folder(path: Path, key: str) -> tuple[Path, Optional[int]]:
    """The checkpoint folder `path` names (the tracker's iteration, or `path` itself) and its iteration."""
    tracker = path / TRACKER
    if not tracker.is_file() and (path / bridge.TRAIN_STATE_TRACKER).is_file():
        step = read_common(path / bridge.TRAIN_STATE_TRACKER).get("step")  # Bridge: {"step": tensor, ...}
        if step is None or not (path / f"iter_{int(step):07d}").is_dir():
            raise MegaslimError(f"{key}={path}: {bridge.TRAIN_STATE_TRACKER} names no existing iteration ({step})")
        path = path / f"iter_{int(step):07d}"
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text != RELEASE and not text.isdigit():
            raise MegaslimError(f"{key}={path}: {TRACKER} holds {text[:40]!r}, neither an iteration nor 'release'")
        name = RELEASE if text == RELEASE else f"iter_{int(text):07d}"
        if not (path / name).is_dir():
            raise MegaslimError(f"{key}={path}: {TRACKER} names {name}/, which is missing")
        path = path / name
    if path.name != RELEASE and not _ITER_RE.match(path.name) and not (path / COMMON).is_file():
        raise MegaslimError(f"{key}={path}: not a Megatron-LM checkpoint folder (iter_NNNNNNN or release)")
    if any(p.name.startswith("mp_rank_") for p in path.iterdir()) and not (path / COMMON).is_file():
        raise MegaslimError(f"{key}={path}: a legacy per-rank Megatron-LM checkpoint (--ckpt-format torch); "
                            "convert it to torch_dist first (pretrain_gpt.py --load DIR --ckpt-convert-format "
                            "torch_dist --ckpt-convert-save NEW_DIR)")
    if not (path / "metadata.json").is_file():
        raise MegaslimError(f"{key}={path}: no metadata.json; megaslim reads torch_dist checkpoints "
                            "(Megatron-LM's default --ckpt-format)")
    return path, (None if path.name == RELEASE else _iteration(path))


def _iteration(path: Path) -> Optional[int]:
    return int(path.name[5:]) if _ITER_RE.match(path.name) else None


def open_checkpoint(path: str | Path, key: str = "model.load") -> MegatronLMCheckpoint:
    """Locate the folder and read its common.pt (restricted unpickler); refuses what is not a Megatron-LM
    GPT checkpoint megaslim can express, before any tensor is read."""
    where, it = folder(Path(path), key)
    common = read_common(where / COMMON)
    if isinstance(common.get("args"), argparse.Namespace):
        found = MegatronLMCheckpoint(where, it, common, common["args"])
    elif (where / bridge.RUN_CONFIG).is_file():
        args = bridge.args_from_run_config(bridge.read_run_config(where / bridge.RUN_CONFIG))
        found = MegatronLMCheckpoint(where, it, common, args)
    else:
        raise MegaslimError(f"{key}={path}: {where / COMMON} carries no Megatron-LM args and there is no "
                            f"{bridge.RUN_CONFIG} (a torch_dist checkpoint saved by something else; megaslim's "
                            "own hold megaslim.json)")
    arch_from_args(found.args, f"{key}={path}")  # refuses MLA, MoE, Mamba, ... now, by name
    return found


def arch_of(found: MegatronLMCheckpoint) -> ModelArch:
    return arch_from_args(found.args, str(found.path))


def tokenizer_dir(found: MegatronLMCheckpoint) -> Optional[Path]:
    """--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR, when DIR is a local directory
    (else megaslim's own copy beside the weights); None: the user sets model.tokenizer."""
    model = get(found.args, "tokenizer_model")
    if get(found.args, "tokenizer_type") == "HuggingFaceTokenizer" and model and _has_tokenizer(Path(model)):
        return Path(model)
    own = found.path / TOKENIZER
    return own if _has_tokenizer(own) else None


def _has_tokenizer(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in _TOKENIZER_FILES)


def load_into(model, found: MegatronLMCheckpoint) -> None:
    """Collective: this rank's shard from the checkpoint at the current TP/PP (megatron reshards)."""
    ckpt.verify_files(found.path, read_common=read_common)
    ckpt.load_sharded(model, found.path)


def model_config_for(model_cfg, found: MegatronLMCheckpoint):
    """`model_cfg` with the vocabulary padding that rebuilds the checkpoint's padded_vocab_size exactly at the
    current TP (make_vocab_size_divisible_by * TP == padded_vocab_size), whatever layout it was saved at."""
    from megatron.core import parallel_state as ps

    padded, tp = found.args.padded_vocab_size, ps.get_tensor_model_parallel_world_size()
    if padded % tp:
        raise MegaslimError(f"{found.path}: its padded vocabulary ({padded} rows) does not divide by TP={tp}")
    return replace(model_cfg, make_vocab_size_divisible_by=padded // tp)

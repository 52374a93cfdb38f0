"""megatron `torch_dist` checkpoints: `root/iter_NNNNNNN/` + `root/latest`, written atomically, loaded
at any TP/PP (dist_checkpointing reshards), checked before anything is unpickled.

Layout of a root:
    latest                      the iteration number of the newest complete checkpoint
    iter_0000100/               megatron dist_checkpointing (torch_dist) files + megaslim.json (+ tokenizer/)
    iter_0000200.partial/       a save in progress (or killed): ignored by readers, removed by the next save
"""
from __future__ import annotations

import dataclasses
import enum
import errno
import io
import json
import pickle
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megaslim import io as mio
from megaslim.errors import MegaslimError
from megaslim.model.arch import ModelArch

FORMAT = "megaslim-torch_dist"
VERSION = 1
META = "megaslim.json"
LATEST = "latest"
TOKENIZER = "tokenizer"
_ITER_RE = re.compile(r"^iter_(\d{7})$")
# Files AutoTokenizer needs; copied so a checkpoint does not depend on where its source lived.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
    "chat_template.json",
)


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# ----------------------------------------------------------------------------------------------
# Finding and describing checkpoints (no torch.distributed needed)


def is_checkpoint(path: str | Path) -> bool:
    """A root with a `latest` marker, or one `iter_*` directory holding megaslim.json."""
    path = Path(path)
    return path.is_dir() and ((path / LATEST).is_file() or (path / META).is_file())


def latest_iteration(root: str | Path) -> Optional[int]:
    """The iteration `latest` names, None when there is none yet."""
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise MegaslimError(f"{marker} is corrupt: expected an iteration number, found {text[:40]!r}")
    return int(text)


def resolve(path: str | Path, iteration: Optional[int] = None) -> Path:
    """The `iter_*` directory that `path` (root or iter dir) and `iteration` (default: latest) name."""
    path = Path(path)
    if (path / META).is_file() and not (path / LATEST).is_file():
        m = _ITER_RE.match(path.name)
        if iteration is not None and (not m or int(m.group(1)) != iteration):
            raise MegaslimError(f"{path} is one checkpoint directory; it does not hold iteration {iteration}")
        return path
    if iteration is None:
        iteration = latest_iteration(path)
        if iteration is None:
            raise MegaslimError(f"{path} is not a megaslim checkpoint (no '{LATEST}' marker or {META})")
    found = path / iter_name(iteration)
    old = found.with_name(found.name + ".old")
    if not found.is_dir() and (old / META).is_file():
        found = old  # a re-save of the same iteration was interrupted between its two renames
    if not found.is_dir():
        raise MegaslimError(
            f"checkpoint {path}: iteration {iteration} is named by '{LATEST}' but {found.name}/ is missing")
    return found


def read_meta(path: str | Path, iteration: Optional[int] = None) -> dict:
    """megaslim.json of the latest (or given) checkpoint, with `path` and an absolute `tokenizer_dir`."""
    ckpt = resolve(path, iteration)
    meta_file = ckpt / META
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise MegaslimError(f"checkpoint {ckpt} is incomplete: {META} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MegaslimError(f"checkpoint {ckpt} is corrupt: {META} is unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("arch"), dict):
        raise MegaslimError(f"checkpoint {ckpt}: {META} is not megaslim checkpoint metadata")
    if meta.get("version", 0) > VERSION:
        raise MegaslimError(
            f"checkpoint {ckpt} has format version {meta['version']}; this megaslim reads up to {VERSION}")
    meta["path"] = str(ckpt)
    if meta.get("tokenizer_dir"):
        meta["tokenizer_dir"] = str(ckpt / meta["tokenizer_dir"])
    return meta


def check_output_dir(path: str | Path) -> None:
    """Refuse a directory with foreign content: only empty, new, or megaslim checkpoint roots are used
    (a root holding nothing but an interrupted `*.partial` save counts as empty)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MegaslimError(f"output directory {path} exists and is a file")
    if not path.exists() or is_checkpoint(path):
        return
    foreign = sorted(p.name for p in path.iterdir() if not p.name.endswith(".partial"))
    if foreign:
        raise MegaslimError(
            f"output directory {path} exists and is not a megaslim checkpoint (holds {foreign[:5]}); "
            "choose a new or empty output_dir")


# ----------------------------------------------------------------------------------------------
# Checking a checkpoint before megatron reads it: readable, complete, and nothing unsafe to unpickle


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: allow only plain data classes and torch type tags."""

    _EXACT = {("torch", "Size"), ("collections", "OrderedDict"), ("torch.serialization", "_get_layout")}

    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name)
        if (module, name) in self._EXACT:
            return obj
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
        if module.startswith("torch.distributed.checkpoint.") and isinstance(obj, type) and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def verify(path: str | Path, iteration: Optional[int] = None) -> dict:
    """Read a checkpoint's metadata and check every data file it references exists and is long
    enough. Returns megaslim.json; raises MegaslimError saying what is wrong."""
    meta = read_meta(path, iteration)
    verify_files(Path(meta["path"]))
    return meta


def _load_common_weights_only(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def verify_files(ckpt: Path, read_common=_load_common_weights_only) -> None:
    """Check one torch_dist folder: metadata.json names torch_dist, `read_common(common.pt)` succeeds
    (a MegaslimError it raises passes through), every data file `.metadata` references is long enough."""

    def corrupt(what: str) -> MegaslimError:
        return MegaslimError(f"checkpoint {ckpt} is corrupt or truncated: {what}")

    try:
        backend = json.loads((ckpt / "metadata.json").read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError) as err:
        raise corrupt(f"metadata.json is missing or unreadable ({err})") from None
    if backend != "torch_dist":
        raise corrupt(f"metadata.json names backend {backend!r}, expected 'torch_dist'")
    try:
        read_common(ckpt / "common.pt")
    except MegaslimError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure means unusable
        raise corrupt(f"common.pt is missing or unreadable ({type(err).__name__}: {err})") from None
    try:
        with open(ckpt / ".metadata", "rb") as f:
            dcp_meta = _MetadataUnpickler(io.BytesIO(f.read())).load()
        storage = dcp_meta.storage_data
    except Exception as err:  # noqa: BLE001
        raise corrupt(f".metadata is missing or unreadable ({type(err).__name__}: {err})") from None
    need: dict[str, int] = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(need.items()):
        f = ckpt / name
        if not f.is_file():
            raise corrupt(f"data file {name} is missing")
        if f.stat().st_size < end:
            raise corrupt(f"data file {name} has {f.stat().st_size} bytes, the index needs {end}")


def check_arch(meta: dict, arch: ModelArch) -> None:
    """Refuse to load a checkpoint of another shape or model, naming the fields that differ."""
    saved = meta["arch"]
    mine = arch.to_dict()
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs model {mine.get(k)!r}"
            for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
    if diff:
        raise MegaslimError(f"checkpoint {meta['path']} is of another model/shape: " + "; ".join(diff))


# ----------------------------------------------------------------------------------------------
# Save and load (collective: every rank calls these)


@contextmanager
def quiet_megatron_internals():
    """megatron's torch_dist strategy calls torch APIs that torch marks deprecated; users cannot act
    on those warnings, so keep them out of every rank's output."""
    with warnings.catch_warnings():
        for message in (r"`(load|save)_state_dict` is deprecated", r"Please use DTensor instead"):
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield


def _clean_stale(root: Path) -> None:
    """Drop saves that were killed mid-write; restore a complete checkpoint left as `.old`."""
    for p in root.glob("iter_*.partial"):
        shutil.rmtree(p, ignore_errors=True)
    for old in root.glob("iter_*.old"):
        final = old.with_name(old.name[: -len(".old")])
        if not final.exists() and (old / META).is_file():
            old.rename(final)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _copy_tokenizer(src: Path, dst: Path) -> bool:
    files = [src / n for n in _TOKENIZER_FILES if (src / n).is_file()]
    if not files:
        return False
    dst.mkdir()
    for f in files:
        shutil.copy2(f, dst / f.name)
    return True


def save_checkpoint(model, arch: ModelArch, root: str | Path, iteration: int, *,
                    tokenizer_dir: str | Path | None = None, extra: Optional[dict] = None,
                    sharded_extra: Optional[dict] = None) -> Path:
    """Save this rank's `model` shard into `root/iter_{iteration:07d}/` (torch_dist) and point `latest`
    at it. `extra`: JSON-able run state kept in megaslim.json. `sharded_extra`: more sharded state
    dicts saved beside "model" (e.g. {"optimizer": ...}); loading them is the caller's business.
    A process killed at any point leaves the previous checkpoint and `latest` untouched.
    megatron's writer starts a `spawn` helper process, so the calling script needs a __main__ guard."""
    from megatron.core import dist_checkpointing

    clash = set(sharded_extra or {}) & {"model"}
    if clash:
        raise ValueError(f"sharded_extra may not use the reserved keys {sorted(clash)}")
    root = Path(root)
    final = root / iter_name(iteration)
    partial = final.with_name(final.name + ".partial")
    rank0 = dist.get_rank() == 0
    with _failed_save(root, partial, rank0):
        if rank0:
            root.mkdir(parents=True, exist_ok=True)
            _clean_stale(root)
            partial.mkdir()
        dist.barrier()

        state = {"model": model.sharded_state_dict(), **(sharded_extra or {})}
        with quiet_megatron_internals():
            dist_checkpointing.save(state, str(partial))  # ends with a barrier: every piece is on disk

        if rank0:
            has_tok = tokenizer_dir is not None and _copy_tokenizer(Path(tokenizer_dir), partial / TOKENIZER)
            meta = _metadata(arch, iteration, tokenizer_dir, has_tok=has_tok, extra=extra,
                             sharded_extra=sharded_extra)
            mio.atomic_write(partial / META, json.dumps(meta, indent=2, default=str) + "\n", durable=True)
            mio.swap_dir(partial, final)  # re-saving an iteration: a crash leaves one complete copy
            mio.atomic_write(root / LATEST, f"{iteration}\n", durable=True)  # only now does it count
    dist.barrier()
    return final


def save_sharded(state: dict, root: Path, partial: Path, **save_kwargs) -> None:
    """Collective: write `state` (sharded tensors + common objects, megatron's torch_dist) into a fresh
    folder `partial` under `root`. A failed save removes `partial` (out of space: one line); putting the
    finished folder into place is the caller's (rank 0, `mio.swap_dir`)."""
    from megatron.core import dist_checkpointing

    rank0 = dist.get_rank() == 0
    with _failed_save(root, partial, rank0):
        if rank0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        dist.barrier()
        with quiet_megatron_internals():
            dist_checkpointing.save(state, str(partial), **save_kwargs)  # ends with a barrier


# Out of space as the writers report it: OSError ENOSPC/EDQUOT, or (torch.save into a file that stopped
# taking bytes, possibly in DCP's writer processes, whose errors arrive as text) "unexpected pos".
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "unexpected pos")


def is_out_of_space(err: BaseException) -> bool:
    """Whether `err` (or what it wraps: causes, DCP's per-rank failures) says the disk is full."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE or any(t in str(e) for t in _NO_SPACE_TEXT):
            return True
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (exc, traceback)}
        for f in failures.values() if isinstance(failures, dict) else ():
            todo += [x for x in (f if isinstance(f, tuple) else (f,)) if isinstance(x, BaseException)]
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
    return False


@contextmanager
def _failed_save(root: Path, partial: Path, rank0: bool):
    """A save that fails removes its `.partial` folder (it may fill the disk); out of space is a user
    error naming the last complete checkpoint. A killed save leaves `.partial` for the next save."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (Exception, CheckpointException) as err:  # DCP's is a BaseException
        _stop_writer_manager()
        if rank0:
            shutil.rmtree(partial, ignore_errors=True)
        if is_out_of_space(err):
            raise MegaslimError(f"no space left on {root}, the last complete checkpoint is "
                                f"{_last_complete(root)}; {partial.name} was removed") from None
        if isinstance(err, CheckpointException) and not getattr(err, "failures", None):
            # DCP reports the cause on its coordinator (rank 0) only; here it raises a bare copy
            raise MegaslimError(f"saving {partial.name[:-len('.partial')]} into {root} failed on another "
                                "rank (rank 0 reports the cause)") from None
        raise


def _stop_writer_manager() -> None:
    """megatron's torch_dist writer keeps a multiprocessing manager (a process) for its results. A launcher
    exits on an error without Python's shutdown (main_guard's os._exit), which would leave that process
    orphaned, holding the job's output pipes open: stop it now (megatron starts another for a next save)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    manager = getattr(getattr(filesystem_async, "_results_queue", None), "_manager", None)
    if manager is not None:
        manager.shutdown()
    filesystem_async._results_queue = None


def _last_complete(root: Path) -> str:
    try:
        last = latest_iteration(root)
    except MegaslimError:
        last = None
    return f"{iter_name(last)} ({root / iter_name(last)})" if last is not None else "none"


def _metadata(arch: ModelArch, iteration: int, tokenizer_dir, *, has_tok: bool, extra: Optional[dict],
              sharded_extra: Optional[dict]) -> dict:
    """megaslim.json of a checkpoint being saved (rank 0, process groups up)."""
    from megatron.core import parallel_state as ps

    return {
        "format": FORMAT,
        "version": VERSION,
        "iteration": iteration,
        "arch": arch.to_dict(),
        "tokenizer_dir": TOKENIZER if has_tok else None,
        "tokenizer_source": str(tokenizer_dir) if tokenizer_dir is not None else None,
        "saved_with": {
            "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
            "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
            "world_size": dist.get_world_size(),
            "megatron_core": _megatron_version(),
        },
        "sharded_extra": sorted(sharded_extra or {}),
        "extra": extra or {},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _megatron_version() -> str:
    try:
        from megatron.core import __version__
        return str(__version__)
    except ImportError:
        return "unknown"


def load_into(model, path: str | Path, *, iteration: Optional[int] = None,
              arch: Optional[ModelArch] = None, sharded_extra: Optional[dict] = None) -> dict:
    """Load the latest (or given) checkpoint into this rank's `model` shard at the current TP/PP.
    Strict: every model tensor must come from the checkpoint. Returns the checkpoint's metadata;
    `sharded_extra` (e.g. {"optimizer": its sharded state dict}) is loaded too and returned in
    meta["loaded_extra"] for the caller to apply (a resume reads its own run's state this way)."""
    meta = verify(path, iteration)
    arch = arch or getattr(model, "arch", None)
    if arch is not None:
        check_arch(meta, arch)
    meta["loaded_extra"] = load_sharded(model, Path(meta["path"]), sharded_extra=sharded_extra)
    return meta


def load_sharded(model, ckpt: Path, *, sharded_extra: Optional[dict] = None) -> dict:
    """Collective: fill this rank's `model` shard from the verified torch_dist folder `ckpt` (any saved
    TP/PP; strict: every model tensor must come from it). Returns the loaded `sharded_extra` entries."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.validation import StrictHandling

    # ShardedObjects (`_extra_state`: None for local layers, FP8 scales for TE) are stored as pickles
    # that torch unpickles without restriction; they are not weights, so they are not read.
    request = {k: v for k, v in model.sharded_state_dict().items() if not isinstance(v, ShardedObject)}
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with quiet_megatron_internals():
            loaded = dist_checkpointing.load(
                {"model": request, **(sharded_extra or {})}, str(ckpt),
                strict=StrictHandling.RAISE_UNEXPECTED)
    except (Exception, CheckpointException) as err:  # DCP's is a BaseException
        cause = _root_cause(err)
        raise MegaslimError(
            f"checkpoint {ckpt} does not load into this model "
            f"({type(cause).__name__}: {_first_line(cause)})") from err
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise MegaslimError(
            f"checkpoint {ckpt} does not match the model: missing {missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}")
    return {k: loaded[k] for k in (sharded_extra or {})}


def _root_cause(err: BaseException) -> BaseException:
    """DCP wraps each rank's exception in a CheckpointException holding {rank: (exc, trace)}."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        if isinstance(first, tuple) and first and isinstance(first[0], BaseException):
            return first[0]
    return err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:500] if text else ""

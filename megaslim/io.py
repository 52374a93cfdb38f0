"""Atomic writes: a reader sees the old file (or folder) or the new one, never a half-written one."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: str | Path) -> Path:
    """A hidden sibling of `path` that is unique to this process (same folder: rename stays atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; it replaces `path` only if the block
    ends normally (for writers that want a path: torch.save, safetensors, numpy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | Path, data: str | bytes, *, durable: bool = False) -> Path:
    """Write text or bytes via a temporary file and rename; `durable` also fsyncs file and folder."""
    with atomic_path(path, durable=durable) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, text)


def write_json(path: str | Path, data: dict) -> Path:
    return atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def swap_dir(partial: str | Path, final: str | Path) -> Path:
    """Put the finished folder `partial` at `final`. An existing `final` is first renamed to
    `final.old` and removed only after the swap, so a crash leaves one complete copy."""
    partial, final = Path(partial), Path(final)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        partial.rename(final)
        shutil.rmtree(old)
    else:
        partial.rename(final)
    fsync_dir(final.parent)
    return final

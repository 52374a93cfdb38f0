"""Output paths checked before compute: a folder can be made and written where the config points."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from megaslim.config.errors import ConfigError


def _existing_ancestor(path: Path, key: str) -> Path:
    """The deepest existing folder on the way to `path`; a file on the way is refused."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"has a file on its way ({p})"
                raise ConfigError(f"{key}={path} {where}; a directory is expected there: choose another {key}")
            return p
    return Path(os.getcwd())


def check_output_dir_writable(path: str | os.PathLike, key: str = "output_dir") -> None:
    """Refuse, naming `key`, an output folder that is a file, lies under a file, or cannot be written
    (tried with a temporary file, removed at once: permission bits say nothing for root or read-only mounts)."""
    path = Path(path).expanduser().absolute()
    parent = _existing_ancestor(path, key)
    try:
        fd, probe = tempfile.mkstemp(prefix=".megaslim-write-check-", dir=parent)
    except OSError as err:
        raise ConfigError(f"{key}={path}: cannot write in {parent} ({err.strerror or err}); "
                          f"choose a writable {key}") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file_writable(path: str | os.PathLike, key: str) -> None:
    """An output file: not a directory, and its folder can be made and written."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise ConfigError(f"{key}={path} is a directory; a file path is expected: choose another {key}")
    check_output_dir_writable(path.parent, key)

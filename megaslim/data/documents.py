"""Text documents of a data file: `.jsonl` (one JSON object per line with a "text" field) or `.txt`
(the whole file is one document). Indexed prefixes are read by data/indexed.py; packing.read_documents
takes either."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from megaslim.errors import MegaslimError


def read_text_documents(path: str | Path) -> Iterator[str]:
    """The documents of a `.jsonl` or `.txt` file, in file order."""
    p = Path(path)
    if not p.is_file():
        raise MegaslimError(f"data file not found: {p} (expected .jsonl, .txt, or an indexed prefix "
                            "with PREFIX.bin and PREFIX.idx)")
    if p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise MegaslimError(f"{p}:{lineno}: not a JSON object with a \"text\" field") from None
                yield text
    elif p.suffix == ".txt":
        yield p.read_text(encoding="utf-8")
    else:
        raise MegaslimError(f"{p}: unsupported data file (expected .jsonl with \"text\", or .txt)")

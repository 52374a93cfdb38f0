"""Documents -> packed token rows: the pinned evaluation/calibration protocol (README, "Evaluation protocol").

Documents in file order, tokenized without BOS, EOS after each document, concatenated, cut into rows
of seq_length + 1 tokens that overlap by one token (megatron GPTDataset convention: every token of the
stream but the first is predicted exactly once).

A megatron indexed prefix (PREFIX.bin/.idx) is also a data path: its documents are token arrays,
used as stored (megaslim's preprocessing, like megatron's --append-eod, already ends each with EOS).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from megaslim.data.documents import read_text_documents
from megaslim.data.indexed import as_prefix, iter_token_documents
from megaslim.errors import MegaslimError


def read_documents(path: str | Path) -> Iterator:
    """Documents of a `.jsonl` (one JSON object per line with a "text" field) or a `.txt` (one doc)
    as str, or of a megatron indexed prefix as int64 token arrays."""
    p = Path(path)
    prefix = as_prefix(p) if p.suffix not in (".jsonl", ".txt") else None
    if prefix is not None:
        yield from iter_token_documents(prefix)
    else:
        yield from read_text_documents(p)


def pack_rows(docs, tokenizer, *, seq_length: int, num_rows: int, eos_id: int | None = None,
              what: str = "data") -> torch.Tensor:
    """[num_rows, seq_length + 1] int64 rows; tokenizes only as many documents as needed.
    A document that is not a str is a sequence of token ids (an indexed dataset's), taken as is."""
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
        raise MegaslimError("the tokenizer has no EOS token; cannot separate documents")
    need = num_rows * seq_length + 1
    stream: list[int] = []
    for text in docs:
        if isinstance(text, str):
            stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            stream.append(eos)
        else:
            stream.extend(text.tolist() if hasattr(text, "tolist") else map(int, text))
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise MegaslimError(
            f"{what}: found {len(stream)} tokens, but {num_rows} rows of {seq_length} tokens need {need}; "
            "give a longer corpus or ask for fewer samples / a shorter data.seq_length"
        )
    flat = torch.tensor(stream[:need], dtype=torch.long)
    idx = torch.arange(num_rows).unsqueeze(1) * seq_length + torch.arange(seq_length + 1)
    return flat[idx]

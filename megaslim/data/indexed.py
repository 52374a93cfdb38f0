"""Text documents -> megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`), and reading one back.

Every document is tokenized without BOS and followed by EOS (megatron's `--append-eod`), one sequence
per document, so reading the stored documents back gives exactly the token stream of the evaluation
protocol (README, "Evaluation protocol"). Tokenization runs in a multiprocessing pool; the files are
written to temporary names and renamed into place, `.idx` last, so a reader never sees a half-written
dataset.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from megaslim import assets
from megaslim import io as mio
from megaslim.data.documents import check_data_file, read_text_documents
from megaslim.errors import MegaslimError

_IDX_HEADER = b"MMIDIDX\x00\x00"  # megatron's .idx magic (indexed_dataset._INDEX_HEADER)
_TOKENIZER = _EOS = None  # the pool worker's tokenizer and EOS id (set once per process by _init_worker)


def is_indexed_prefix(path: str | os.PathLike) -> bool:
    return os.path.isfile(f"{path}.bin") and os.path.isfile(f"{path}.idx")


def as_prefix(path: str | os.PathLike) -> Optional[str]:
    """The indexed prefix that `path` names (`PREFIX`, `PREFIX.bin` or `PREFIX.idx`), else None."""
    path = os.fspath(path)
    for candidate in (path, path[:-4] if path.endswith((".bin", ".idx")) else None):
        if candidate and is_indexed_prefix(candidate):
            return candidate
    return None


def open_indexed(prefix: str | os.PathLike):
    """megatron's IndexedDataset, with a clear error for a truncated or foreign pair of files."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

    prefix = os.fspath(prefix)
    with open(f"{prefix}.idx", "rb") as f:
        header = f.read(len(_IDX_HEADER))
    if header != _IDX_HEADER:  # checked here: megatron asserts, then trips in its own __del__
        raise MegaslimError(f"{prefix}.idx: not a readable megatron indexed dataset (bad header)")
    try:
        ds = IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, OSError, KeyError) as err:
        raise MegaslimError(f"{prefix}.idx: not a readable megatron indexed dataset ({err})") from None
    expected = int(ds.sequence_lengths.astype(np.int64).sum()) * DType.size(ds.index.dtype)
    if os.path.getsize(f"{prefix}.bin") != expected:
        raise MegaslimError(
            f"{prefix}.bin: {os.path.getsize(prefix + '.bin')} bytes, but its .idx describes {expected}; "
            "the files are truncated or do not belong together: preprocess again")
    return ds


def iter_token_documents(prefix: str | os.PathLike) -> Iterator[np.ndarray]:
    """The stored documents of an indexed dataset, in order, as int64 token arrays (EOS included
    when the dataset was built with one, as megaslim's and megatron's `--append-eod` do)."""
    ds = open_indexed(prefix)
    bounds = ds.document_indices
    for d in range(len(bounds) - 1):
        start, stop = int(bounds[d]), int(bounds[d + 1])
        if stop - start == 1:
            yield ds[start].astype(np.int64)
        else:  # a document of several sequences (e.g. sentence-split megatron data)
            yield np.concatenate([ds[i] for i in range(start, stop)]).astype(np.int64)


def _init_worker(tokenizer, eos_id: int, in_pool: bool = False) -> None:
    global _TOKENIZER, _EOS
    _TOKENIZER, _EOS = tokenizer, eos_id
    if in_pool:  # one document per call: Rust-side threads would only oversubscribe the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode(text: str) -> np.ndarray:
    ids = _TOKENIZER(text, add_special_tokens=False)["input_ids"]
    ids.append(_EOS)
    return np.asarray(ids, dtype=np.int64)


def token_dtype(vocab_size: int):
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)  # uint16 below 65500 entries, as megatron does


def write_indexed(docs: Iterable[str], tokenizer, out_prefix: str | os.PathLike, *, workers: int = 1,
                  eos_id: Optional[int] = None, progress: bool = True, desc: str = "tokenizing",
                  chunksize: int = 16) -> dict:
    """Tokenize `docs` (EOS after each) into `out_prefix.{bin,idx}`; returns {documents, tokens}.

    `workers` > 1 tokenizes in a process pool (each worker gets a copy of the tokenizer once);
    documents keep their order. Existing files at `out_prefix` are replaced only once the new
    pair is complete, and a failure leaves no temporary files."""
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
        raise MegaslimError("the tokenizer has no EOS token; cannot separate documents")
    out_prefix = os.fspath(out_prefix)
    # the .idx is renamed last: until it is in place, the prefix is not a dataset
    with mio.atomic_path(f"{out_prefix}.idx") as tmp_idx, mio.atomic_path(f"{out_prefix}.bin") as tmp_bin:
        n_docs, n_tokens = _build(docs, tokenizer, eos, tmp_bin, tmp_idx, workers=workers, progress=progress,
                                  desc=desc, chunksize=chunksize)
        if n_docs == 0:
            raise MegaslimError(f"no documents to write to {out_prefix}: the input is empty")
        if os.path.exists(f"{out_prefix}.idx"):  # never a new .bin beside the old .idx
            os.remove(f"{out_prefix}.idx")
    return {"documents": n_docs, "tokens": n_tokens, "prefix": out_prefix}


def _build(docs: Iterable[str], tokenizer, eos: int, bin_path: Path, idx_path: Path, *, workers: int,
           progress: bool, desc: str, chunksize: int) -> tuple[int, int]:
    """Tokenize into the files `bin_path` / `idx_path`; (documents, tokens)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    n_docs = n_tokens = 0
    pool = None
    builder = IndexedDatasetBuilder(str(bin_path), dtype=token_dtype(len(tokenizer)))
    try:
        if workers > 1:
            # each worker inherits or unpickles the tokenizer once, not once per document
            pool = mp.Pool(workers, initializer=_init_worker, initargs=(tokenizer, eos, True))
            encoded = pool.imap(_encode, docs, chunksize=chunksize)
        else:
            _init_worker(tokenizer, eos)
            encoded = map(_encode, docs)
        with tqdm(encoded, desc=desc, unit=" docs", disable=not progress, mininterval=1.0) as bar:
            for ids in bar:
                builder.add_document(ids, [len(ids)])
                n_docs += 1
                n_tokens += len(ids)
                bar.set_postfix(tokens=n_tokens, refresh=False)
        builder.finalize(str(idx_path))
    finally:
        builder.data_file.close()  # finalize() closed it already, unless something failed
        if pool is not None:
            pool.terminate()
    return n_docs, n_tokens


def tokenizer_fingerprint(tokenizer) -> str:
    """A short digest of what decides token ids (vocabulary, merges, EOS), to key cached datasets."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:16]


def cached_indexed(path: str | os.PathLike, tokenizer, *, workers: Optional[int] = None) -> str:
    """An indexed prefix for `path`: itself if it already is one, else its tokenization, built once
    into the megaslim cache (keyed by file content and tokenizer) under a file lock."""
    prefix = as_prefix(path)
    if prefix is not None:
        open_indexed(prefix)  # a foreign or truncated pair is refused now, not after the model is built
        return prefix
    p = Path(path)
    check_data_file(p)
    key = f"{p.stem[:40]}-{assets.sha256_of(p)[:16]}-{tokenizer_fingerprint(tokenizer)}"
    out = assets.cache_dir() / "indexed" / key
    with assets.lock(f"indexed-{key}"):
        if not is_indexed_prefix(out):
            workers = workers or min(4, os.cpu_count() or 1)
            write_indexed(read_text_documents(p), tokenizer, out, workers=workers, desc=f"tokenizing {p.name}")
    return str(out)

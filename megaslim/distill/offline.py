"""Offline teacher logits: the teacher's top-k log-probabilities, computed once per training sample
(`launch/teacher_logits.py`, `megaslim.commands.teacher_logits`), stored in safetensors shards, and a KD
loss that reads them instead of running a teacher (distillation without the teacher in memory).

Store layout (a directory):
  teacher_logits.json      index, written last (its presence means the store is complete): format,
                           teacher identity (arch, tokenizer fingerprint, weights digest, source), data
                           identity (indexed prefix digest, seed, dataset size, seq_length), k, dtype,
                           sample count and the shard table
  shards/shard-RRR-NNNNN.safetensors
                           per shard: `sample_ids` int64 [n], `text` int32 [n, S+1] (the GPTDataset
                           sample: tokens = text[:, :-1], labels = text[:, 1:]), `topk_idx` int32
                           [n, S, k] (global vocab ids, sorted by descending teacher probability),
                           `topk_logp` float32 | float16 | bfloat16 [n, S, k] (log-softmax of the
                           teacher logits at temperature 1 over the real vocabulary)
  tokenizer/               copy of the teacher's tokenizer

Why log-probs at temperature 1 suffice: the top-k set does not depend on the temperature (softmax is
monotone), and renormalising over that set is shift invariant, so
log_softmax(stored_logp / tau) == log_softmax(teacher_logits[top-k] / tau) -- exactly the teacher side
of the online top-k KL (`losses.logit_kd_per_token(kind="topk")`). The student side is computed the
same way as online, on vocab-parallel logits, without gathering the vocabulary. So the offline loss
equals the online top-k loss on the same samples (float32 storage: to rounding; float16: ~1e-3).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from megaslim import assets
from megaslim import checkpoint as ckpt
from megaslim import io as mio
from megaslim.data.indexed import tokenizer_fingerprint
from megaslim.data.loaders import gpt_dataset, micro_batches
from megaslim.distill.losses import _prepare, _sum_to_replicated, _tp, vocab_parallel_topk
from megaslim.errors import MegaslimError
from megaslim.model.arch import ModelArch
from megaslim.runtime import ParallelLayout

FORMAT = "megaslim-teacher-topk"
VERSION = 1
INDEX = "teacher_logits.json"
SHARDS = "shards"
TOKENIZER = "tokenizer"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# identity of the teacher and the data
# --------------------------------------------------------------------------------------------------
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".distcp", ".pt", ".gguf")


def _file_sample_digest(path: Path, h, chunk: int = 1 << 20) -> None:
    """Name, size and the first and last MiB of a file: cheap on multi-GB weights, and a different
    set of weights changes the header or the data at both ends."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))


def weights_digest(source) -> str:
    """A short digest of a model source's weight files (megaslim.sources.Source)."""
    root = ckpt.resolve(source.path) if source.kind == "checkpoint" else Path(source.path)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES
                   and TOKENIZER not in p.relative_to(root).parts[:-1])
    for p in files:
        _file_sample_digest(p, h)
    if not files:
        raise MegaslimError(f"{source.label}: no weight files found to fingerprint")
    return h.hexdigest()[:16]


def teacher_identity(source, arch, tokenizer) -> dict:
    return {"arch": arch.to_dict(), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "weights_digest": weights_digest(source), "source": str(source.label)}


def data_identity(prefix: str) -> dict:
    """The indexed dataset: its .idx digest (document lengths, dtype) and .bin size."""
    return {"prefix": str(prefix), "idx_sha256": assets.sha256_of(Path(f"{prefix}.idx"))[:16],
            "bin_bytes": os.path.getsize(f"{prefix}.bin")}


# --------------------------------------------------------------------------------------------------
# top-k of vocab-parallel logits, and the loss against stored top-k
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def topk_logprobs(logits: torch.Tensor, *, vocab_size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(global token ids, log-probs) of the k most probable tokens per position, from this TP rank's
    vocab shard [..., V/TP]; sorted by descending probability, replicated on every TP rank.

    Candidates and order are those of the online top-k KL at temperature 1 (each shard proposes its
    top-k, k values per rank are exchanged; float32; padded vocab masked); the log-normaliser uses an
    all-reduced sum of exponentials, so the vocabulary is never gathered."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise MegaslimError(f"top-k needs an integer k in [1, vocab_size={vocab_size}] (got {k!r})")
    group, rank, world = _tp()
    x = _prepare(logits, 1.0, vocab_size)
    part = x.shape[-1]
    top_vals, top_idx = vocab_parallel_topk(x, k, start=rank * part, group=group, world=world)
    peak = top_vals[..., :1]  # the global max
    sum_exp = (x - peak).exp().sum(dim=-1, keepdim=True)
    if world > 1:
        dist.all_reduce(sum_exp, group=group)
    return top_idx, top_vals - (peak + sum_exp.log())


def offline_topk_kl_per_token(*, student_logits: torch.Tensor, topk_idx: torch.Tensor,
                              topk_logp: torch.Tensor, vocab_size: int, temperature: float = 1.0,
                              top_k: Optional[int] = None) -> torch.Tensor:
    """Per-token KL(p_k || q_k) over the stored teacher top-k set, both renormalised over the set,
    times temperature**2: the online `logit_kd_per_token(kind="topk")` with the teacher replaced by
    its stored top-k. `student_logits` [..., V/TP] (this TP rank's shard), `topk_idx`/`topk_logp`
    [..., K] with K >= top_k (default: all K stored). Replicated on every TP rank; the student
    gradient lands on the owning shard only."""
    if not temperature > 0:
        raise MegaslimError(f"KD temperature must be > 0 (got {temperature})")
    stored = topk_idx.shape[-1]
    k = stored if top_k is None else top_k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= stored:
        raise MegaslimError(f"distill.top_k={top_k!r}: the offline logits hold the teacher's top {stored}; "
                            f"choose top_k in [1, {stored}] or recompute them with a larger distill.top_k")
    if topk_idx.shape != topk_logp.shape or topk_idx.shape[:-1] != student_logits.shape[:-1]:
        raise MegaslimError(f"offline top-k {tuple(topk_idx.shape)}/{tuple(topk_logp.shape)} does not match "
                            f"the student logits {tuple(student_logits.shape)} (same layout, last dim k)")
    _, rank, _ = _tp()
    s = _prepare(student_logits, temperature, vocab_size)
    part = s.shape[-1]
    local = topk_idx[..., :k].to(device=s.device, dtype=torch.long) - rank * part
    owned = (local >= 0) & (local < part)
    picked = s.gather(-1, local.clamp(0, part - 1))
    s_top = _sum_to_replicated(torch.where(owned, picked, torch.zeros_like(picked)))
    log_p = (topk_logp[..., :k].to(device=s.device, dtype=s.dtype) / temperature).log_softmax(dim=-1)
    log_q = s_top.log_softmax(dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1) * temperature ** 2


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
def _ranges(ids: list[int]) -> list[list[int]]:
    """Sorted ids -> [[start, stop), ...] runs."""
    out: list[list[int]] = []
    for i in ids:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


class ShardWriter:
    """Collects rows (sample ids, text, top-k) of one writing rank and writes them as shards."""

    def __init__(self, directory: Path, *, tag: str, dtype: str, samples_per_shard: int):
        self.dir, self.tag, self.dtype = Path(directory), tag, DTYPES[dtype]
        self.per_shard = samples_per_shard
        self.pending: list[dict] = []
        self.records: list[dict] = []
        self.bytes = 0

    def add(self, *, sample_ids: torch.Tensor, text: torch.Tensor, topk_idx: torch.Tensor,
            topk_logp: torch.Tensor) -> None:
        for i in range(sample_ids.shape[0]):
            self.pending.append({"sample_ids": sample_ids[i:i + 1].to("cpu", torch.int64),
                                 "text": text[i:i + 1].to("cpu", torch.int32),
                                 "topk_idx": topk_idx[i:i + 1].to("cpu", torch.int32),
                                 "topk_logp": topk_logp[i:i + 1].to("cpu", self.dtype)})
            if len(self.pending) == self.per_shard:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        tensors = {k: torch.cat([r[k] for r in self.pending]).contiguous() for k in self.pending[0]}
        name = f"shard-{self.tag}-{len(self.records):05d}.safetensors"
        with mio.atomic_path(self.dir / name) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
        ids = tensors["sample_ids"].tolist()
        if ids != sorted(ids):
            raise MegaslimError("internal: shard rows are not in sample order")
        self.records.append({"file": name, "rows": len(ids), "ranges": _ranges(ids)})
        self.bytes += (self.dir / name).stat().st_size
        self.pending = []


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def is_offline_dir(path) -> bool:
    return path is not None and (Path(path).expanduser() / INDEX).is_file()


def offline_dir(cfg) -> Optional[Path]:
    """The offline-logits store a distillation config names: a `distill.teacher.load` that is one."""
    t = cfg.distill.teacher.load
    return Path(t).expanduser() if is_offline_dir(t) else None


class TopKStore:
    """A finished offline-logits directory, read lazily (only the requested rows of a shard)."""

    def __init__(self, path, meta: dict):
        self.path, self.meta = Path(path), meta
        spans = []
        for shard_no, rec in enumerate(meta["shards"]):
            row = 0
            for start, stop in rec["ranges"]:
                spans.append((start, stop, shard_no, row))
                row += stop - start
        spans.sort()
        self._spans = spans
        self._starts = [s[0] for s in spans]

    @classmethod
    def open(cls, path) -> "TopKStore":
        path = Path(path).expanduser()
        index = path / INDEX
        try:
            meta = json.loads(index.read_text())
        except FileNotFoundError:
            raise MegaslimError(f"{path}: not an offline-logits directory ({INDEX} is missing)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MegaslimError(f"{index} is unreadable ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise MegaslimError(f"{index} is not a megaslim offline-logits index")
        if meta.get("version", 0) > VERSION:
            raise MegaslimError(f"{index} has format version {meta['version']}; this megaslim reads up to {VERSION}")
        missing = [r["file"] for r in meta["shards"] if not (path / SHARDS / r["file"]).is_file()]
        if missing:
            raise MegaslimError(f"{path}: {len(missing)} shard file(s) are missing (e.g. {missing[0]}); "
                                "the store is incomplete: compute it again")
        return cls(path, meta)

    # -- what it holds ----------------------------------------------------------------------------
    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def num_samples(self) -> int:
        return int(self.meta["num_samples"])

    @property
    def seq_length(self) -> int:
        return int(self.meta["data"]["seq_length"])

    @property
    def teacher_arch(self):
        return ModelArch.from_dict(self.meta["teacher"]["arch"])

    @property
    def tokenizer_dir(self) -> Optional[Path]:
        d = self.path / TOKENIZER
        return d if d.is_dir() else None

    def check(self, *, tokenizer=None, seq_length: Optional[int] = None, top_k: Optional[int] = None,
              num_samples: Optional[int] = None, seed: Optional[int] = None, data: Optional[dict] = None,
              vocab_size: Optional[int] = None, teacher: Optional[dict] = None) -> None:
        """Refuse a store made for another tokenizer, teacher, sequence length, corpus or data order,
        or one too small for this run; every problem in one message."""
        m, problems = self.meta, []
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != m["teacher"]["tokenizer_fingerprint"]:
            problems.append("they were computed with another tokenizer (fingerprint "
                            f"{m['teacher']['tokenizer_fingerprint']} vs {tokenizer_fingerprint(tokenizer)})")
        if teacher is not None:
            if teacher["arch"] != m["teacher"]["arch"]:
                problems.append(f"they come from another teacher (architecture differs from {teacher['source']})")
            elif teacher.get("weights_digest") != m["teacher"].get("weights_digest"):
                problems.append(f"they come from another teacher (weights of {teacher['source']} differ from "
                                f"those of {m['teacher']['source']})")
        if seq_length is not None and seq_length != self.seq_length:
            problems.append(f"they were computed at data.seq_length={self.seq_length}, this run uses {seq_length}")
        if top_k is not None and not 1 <= top_k <= self.top_k:
            problems.append(f"they hold the teacher's top {self.top_k}, distill.top_k={top_k} asks for more")
        if vocab_size is not None and vocab_size != m["teacher"]["arch"]["vocab_size"]:
            problems.append(f"the teacher's vocabulary ({m['teacher']['arch']['vocab_size']}) differs from the "
                            f"student's ({vocab_size})")
        if seed is not None and seed != m["data"]["seed"]:
            problems.append(f"they follow the data order of train.seed={m['data']['seed']}, this run has "
                            f"train.seed={seed}")
        if data is not None and (data["idx_sha256"], data["bin_bytes"]) != (m["data"]["idx_sha256"],
                                                                         m["data"]["bin_bytes"]):
            problems.append(f"they were computed on another training corpus ({m['data']['prefix']}, "
                            f"this run reads {data['prefix']})")
        if num_samples is not None and num_samples > self.num_samples:
            problems.append(f"they cover {self.num_samples} samples, this run needs {num_samples} "
                            "(train.train_iters x train.global_batch_size): compute them for more steps")
        if problems:
            raise MegaslimError(f"offline teacher logits {self.path} do not fit this run: " + "; ".join(problems))

    # -- rows -------------------------------------------------------------------------------------
    def _locate(self, sample_id: int) -> tuple[int, int]:
        i = bisect.bisect_right(self._starts, sample_id) - 1
        if i < 0 or not self._spans[i][0] <= sample_id < self._spans[i][1]:
            raise MegaslimError(f"{self.path}: sample {sample_id} is not in the offline logits "
                                f"(they cover samples [0, {self.num_samples}))")
        start, _, shard, row = self._spans[i]
        return shard, row + sample_id - start

    def read(self, sample_ids, *, top_k: Optional[int] = None) -> dict[str, torch.Tensor]:
        """{"text", "topk_idx", "topk_logp"} for the given global sample ids, in that order
        (ids of one micro-batch are contiguous, hence one slice per shard in practice)."""
        k = self.top_k if top_k is None else top_k
        parts: dict[str, list] = {"text": [], "topk_idx": [], "topk_logp": []}
        located = [self._locate(int(i)) for i in sample_ids]
        j = 0
        while j < len(located):  # group runs of consecutive rows of the same shard
            shard, row = located[j]
            n = 1
            while j + n < len(located) and located[j + n] == (shard, row + n):
                n += 1
            with safe_open(str(self.path / SHARDS / self.meta["shards"][shard]["file"]), "pt") as f:
                ids = f.get_slice("sample_ids")[row:row + n]
                expect = torch.tensor([int(i) for i in sample_ids[j:j + n]], dtype=ids.dtype)
                if not torch.equal(ids, expect):
                    raise MegaslimError(f"{self.path}: shard {self.meta['shards'][shard]['file']} is "
                                        "inconsistent with the index")
                parts["text"].append(f.get_slice("text")[row:row + n])
                parts["topk_idx"].append(f.get_slice("topk_idx")[row:row + n, :, :k])
                parts["topk_logp"].append(f.get_slice("topk_logp")[row:row + n, :, :k])
            j += n
        return {name: torch.cat(v) for name, v in parts.items()}


def sample_ids(*, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int,
               num_samples: int) -> Iterator[list[int]]:
    """Global sample ids of this DP rank's micro-batches, in the order of
    `megaslim.data.loaders.micro_batches` (megatron's pretraining sampler)."""
    round_size = micro_batch_size * dp_size
    base = consumed_samples
    while base + round_size <= num_samples:
        start = base + dp_rank * micro_batch_size
        yield list(range(start, start + micro_batch_size))
        base += round_size


def offline_micro_batches(store: TopKStore, prefix, tokenizer, *, micro_batch_size: int,
                          global_batch_size: int, train_iters: int, dp_rank: int, dp_size: int,
                          consumed_samples: int = 0, top_k: Optional[int] = None,
                          cache_path=None) -> Iterator[dict[str, torch.Tensor]]:
    """The distill loop's micro-batches (same GPTDataset samples, same order) with the stored teacher
    top-k added as `teacher_topk_idx` (int64) and `teacher_topk_logp` (float32), [mbs, S, k].
    Each sample's tokens are compared with the stored ones: a store that does not belong to this
    data is refused, never silently used."""
    total = train_iters * global_batch_size
    ParallelLayout(world_size=dp_size, dp=dp_size).check_global_batch(global_batch_size, micro_batch_size)
    store.check(num_samples=total)
    ds = gpt_dataset(prefix, tokenizer, seq_length=store.seq_length,
                     num_samples=int(store.meta["data"]["dataset_num_samples"]),
                     seed=int(store.meta["data"]["seed"]), cache_path=cache_path)
    ids = sample_ids(micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                     consumed_samples=consumed_samples, num_samples=total)
    for mb, mb_ids in zip(micro_batches(ds, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                                        dp_size=dp_size, consumed_samples=consumed_samples,
                                        num_samples=total), ids):
        rows = store.read(mb_ids, top_k=top_k)
        text = rows["text"].long()
        if not (torch.equal(text[:, :-1], mb["tokens"]) and torch.equal(text[:, 1:], mb["labels"])):
            raise MegaslimError(f"offline teacher logits {store.path}: the stored tokens of samples "
                                f"{mb_ids[0]}..{mb_ids[-1]} differ from the training data; they were "
                                "computed for another corpus or data order")
        mb["teacher_topk_idx"] = rows["topk_idx"].long()
        mb["teacher_topk_logp"] = rows["topk_logp"].float()
        yield mb


def teacher_eval_for(store: TopKStore, *, eval_path, num_samples: int, seq_length: int) -> Optional[dict]:
    """The teacher's held-out result recorded with the logits, if it was measured on this eval set."""
    e = store.meta.get("teacher_eval")
    if e and e.get("eval_path") == str(eval_path) and e.get("num_samples") == num_samples \
            and e.get("seq_length") == seq_length:
        return e
    return None




# --------------------------------------------------------------------------------------------------
# a store's life: begun empty, shards written per rank, finished by the index
# --------------------------------------------------------------------------------------------------
def partial_shards(out: Path) -> Path:
    """Where the writing ranks put their shards until the store is finished."""
    return Path(out) / (SHARDS + ".partial")


def begin_store(out: Path) -> Path:
    """An empty `partial_shards(out)` folder for the writing ranks (call on the writer rank)."""
    partial = partial_shards(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(out / SHARDS, ignore_errors=True)  # a leftover of a run killed before its index: free it now
    partial.mkdir()
    return partial


def finish_store(out: Path, tokenizer, fields: dict, *, num_samples: int) -> dict:
    """Put the written shards and the tokenizer in place, then write the index (last: from then on
    the store is complete). `fields` holds the index entries after format and version."""
    covered = sorted(rng for r in fields["shards"] for rng in map(tuple, r["ranges"]))
    if _ranges_total(covered) != num_samples:
        raise MegaslimError(f"internal: the shards cover {_ranges_total(covered)} samples, expected {num_samples}")
    mio.swap_dir(partial_shards(out), out / SHARDS)
    tok_partial = out / (TOKENIZER + ".partial")
    shutil.rmtree(tok_partial, ignore_errors=True)
    tokenizer.save_pretrained(str(tok_partial))  # the one the logits were made with
    mio.swap_dir(tok_partial, out / TOKENIZER)
    index = {"format": FORMAT, "version": VERSION, **fields}
    mio.write_json(out / INDEX, index)
    return index


def _ranges_total(ranges) -> int:
    """Samples covered by a sorted list of [start, stop) ranges (overlaps counted once)."""
    n, end = 0, -1
    for a, b in ranges:
        a = max(a, end)
        if b > a:
            n += b - a
            end = b
    return n

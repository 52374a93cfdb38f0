"""Training data: megatron's GPTDataset (built by BlendedMegatronDatasetBuilder) over an indexed prefix,
served as per-DP-rank micro-batches {tokens, labels, loss_mask, position_ids} of [mbs, seq_length].

Sample order is megatron's (documents and samples shuffled with `seed`), and step k of a run always
reads global samples [k * gbs, (k + 1) * gbs), so resuming from `consumed_samples` replays the same data.
Call on every rank of the job: with torch.distributed up, the builder builds the sample index on
rank 0, caches it under `cache_path` (must be visible to all ranks) and the others read it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator, Optional

import torch

from megaslim import assets
from megaslim.data.indexed import as_prefix, open_indexed
from megaslim.errors import MegaslimError
from megaslim.runtime.layout import ParallelLayout

_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class _TokenizerInfo:
    """The part of a megatron tokenizer GPTDataset reads: EOD (for masks), vocab size (token dtype)
    and the pad id, -1 as megatron's own default: it never collides with a real token (HF tokenizers
    often reuse EOS as pad, which would mask every EOS out of the loss)."""

    pad = -1

    def __init__(self, eod: int, vocab_size: int):
        self.eod = eod
        self.vocab_size = vocab_size
        self.unique_identifiers = {"class": "megaslim", "eod": eod, "vocab_size": vocab_size}


def _cache_dir_for(prefix: str, cache_path: Optional[str | os.PathLike]) -> str:
    """Megatron keys its cached sample indices by path and config, not file content: add the .idx/.bin
    sizes and mtimes so re-preprocessing a prefix can never reuse stale indices."""
    stat = [os.stat(prefix + s) for s in (".bin", ".idx")]
    key = hashlib.sha256(repr([(s.st_size, s.st_mtime_ns) for s in stat]).encode()).hexdigest()[:12]
    root = Path(cache_path) if cache_path is not None else assets.cache_dir() / "gpt_indices"
    return str(root / f"{Path(prefix).name}-{key}")


def gpt_dataset(prefix: str | os.PathLike, tokenizer, *, seq_length: int, num_samples: int, seed: int,
                cache_path: Optional[str | os.PathLike] = None):
    """megatron GPTDataset of at least `num_samples` samples of `seq_length` (+1) tokens over all of
    `prefix` (more epochs when it is short). `tokenizer`: the HF tokenizer (its EOS id and size)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    given, prefix = prefix, as_prefix(prefix)
    if prefix is None:
        raise MegaslimError(f"{given}: training data must be a megatron indexed prefix (.bin/.idx); "
                            "run launch/preprocess_data.py first")
    if open_indexed(prefix).sequence_lengths.size == 0:  # also validates the pair of files
        raise MegaslimError(f"{prefix}: the indexed dataset holds no documents")
    if tokenizer.eos_token_id is None:
        raise MegaslimError("the tokenizer has no EOS token")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split="1,0,0",  # everything is training data; held-out data comes from data.eval_path
        path_to_cache=_cache_dir_for(prefix, cache_path),
        tokenizer=_TokenizerInfo(tokenizer.eos_token_id, len(tokenizer)),
        reset_position_ids=False,  # documents are packed end to end, as in the eval protocol
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal masking happens in the model
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples, None, None], lambda: True, config).build()
    return train


def micro_batches(dataset, *, micro_batch_size: int, dp_rank: int, dp_size: int,
                  consumed_samples: int = 0, num_samples: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches, in order: each round of mbs * dp consecutive samples gives rank r
    the samples [r * mbs, (r + 1) * mbs) of the round (megatron's pretraining sampler), from sample
    `consumed_samples` up to `num_samples` (default: the dataset's length); no partial round.
    Each micro-batch: tokens/labels/position_ids int64 and loss_mask float, [mbs, S]."""
    if not 0 <= dp_rank < dp_size:
        raise MegaslimError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    end = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    round_size = micro_batch_size * dp_size
    base = consumed_samples
    while base + round_size <= end:
        start = base + dp_rank * micro_batch_size
        samples = [dataset[i] for i in range(start, start + micro_batch_size)]
        yield {k: torch.stack([s[k] for s in samples]) for k in _KEYS}
        base += round_size


def train_micro_batches(prefix: str | os.PathLike, tokenizer, *, seq_length: int, micro_batch_size: int,
                        global_batch_size: int, train_iters: int, dp_rank: int, dp_size: int,
                        seed: int, consumed_samples: int = 0,
                        cache_path: Optional[str | os.PathLike] = None) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches of this DP rank for a whole run of `train_iters` steps of `global_batch_size`
    samples (gradient accumulation = gbs / (mbs * dp) micro-batches per step)."""
    ParallelLayout(world_size=dp_size, dp=dp_size).check_global_batch(global_batch_size, micro_batch_size)
    total = train_iters * global_batch_size
    ds = gpt_dataset(prefix, tokenizer, seq_length=seq_length, num_samples=total, seed=seed,
                     cache_path=cache_path)
    return micro_batches(ds, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                         consumed_samples=consumed_samples, num_samples=total)

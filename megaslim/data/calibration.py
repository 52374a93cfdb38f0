"""Calibration set for importance scoring: N packed samples of S tokens, split over data-parallel ranks.

Same protocol as evaluation (packing.py): documents in file order, EOS after each, packed end to end
(no padding), rows of S + 1 tokens overlapping by one (inputs and labels). Every rank packs the same N
rows and keeps rows r, r + dp, ..., so the union over ranks is the DP=1 set whatever the DP size.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megaslim.data.corpora import data_path
from megaslim.data.packing import pack_rows, read_documents
from megaslim.errors import MegaslimError
from megaslim.runtime.layout import ParallelLayout


def calibration_rows(path: Optional[str | os.PathLike], tokenizer, *, num_samples: int, seq_length: int,
                     dp_rank: int = 0, dp_size: int = 1) -> torch.Tensor:
    """This DP rank's calibration rows, [ceil((N - r) / dp), S + 1] int64, from `path` (.jsonl with
    "text", .txt or an indexed prefix; None: the default corpus's train split)."""
    if num_samples < 1 or seq_length < 1:
        raise MegaslimError(f"calibration needs num_samples >= 1 and seq_length >= 1 "
                            f"(got {num_samples}, {seq_length})")
    if not 0 <= dp_rank < dp_size:
        raise MegaslimError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    src = data_path(path, "data.calib_path")
    rows = pack_rows(read_documents(src), tokenizer, seq_length=seq_length, num_rows=num_samples,
                     what=f"calibration data {src}")
    return ParallelLayout(world_size=dp_size, dp=dp_size).shard_rows(rows, dp_rank).contiguous()

"""The held-out rows of the evaluation protocol: data.eval_path packed into eval.num_samples rows."""
from __future__ import annotations

import os
from typing import Optional

import torch

from megaslim.data.corpora import data_path
from megaslim.data.packing import pack_rows, read_documents


def heldout_rows(eval_path: Optional[str | os.PathLike], tokenizer, *, seq_length: int,
                 num_samples: int) -> torch.Tensor:
    """The first `num_samples` packed rows [n, S + 1] of `eval_path` (None: the default corpus's
    validation split), documents in file order, EOS between them."""
    path = data_path(eval_path, "data.eval_path")
    return pack_rows(read_documents(path), tokenizer, seq_length=seq_length, num_rows=num_samples,
                     what=f"data.eval_path={path}")

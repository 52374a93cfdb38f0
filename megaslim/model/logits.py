"""Losses on vocab-parallel logits: padded vocab entries masked, the vocabulary never gathered."""
from __future__ import annotations

import torch


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Push the padded vocab columns of this TP rank's logit shard to -inf-ish (finite: no NaN grads)."""
    from megatron.core import parallel_state as ps

    part = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * part
    if start + part <= vocab_size:
        return logits
    col = torch.arange(start, start + part, device=logits.device)
    return logits.masked_fill(col >= vocab_size, torch.finfo(logits.dtype).min)


def vocab_parallel_ce(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token next-token loss from a [..., V/TP] logit shard (same shape as `labels`)."""
    from megatron.core import tensor_parallel

    logits = mask_padded_vocab(logits.float(), vocab_size)
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)

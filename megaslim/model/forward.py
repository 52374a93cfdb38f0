"""Forward passes through megatron-core's pipeline schedules (works at any TP/PP; PP=1 included)."""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch


def make_microbatches(rows: torch.Tensor, micro_batch_size: int) -> list[dict]:
    """Rows of S+1 tokens -> micro-batches {tokens, labels, position_ids, loss_mask}; the last one is
    padded with masked rows so every micro-batch has the same shape (pipeline p2p needs it)."""
    n, s1 = rows.shape
    s = s1 - 1
    pad = (-n) % micro_batch_size
    mask = torch.ones(n + pad, s)
    if pad:
        rows = torch.cat([rows, rows[:1].expand(pad, -1)], 0)
        mask[n:] = 0
    out = []
    for i in range(0, n + pad, micro_batch_size):
        chunk = rows[i:i + micro_batch_size]
        out.append({
            "tokens": chunk[:, :-1].contiguous(),
            "labels": chunk[:, 1:].contiguous(),
            "position_ids": torch.arange(s).unsqueeze(0).expand(chunk.shape[0], -1).contiguous(),
            "loss_mask": mask[i:i + micro_batch_size],
        })
    return out


def run_forward(model, microbatches: list[dict], on_output: Callable[[dict, torch.Tensor], dict],
                *, seq_length: int, micro_batch_size: int,
                on_batch: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Run forward-only over `microbatches`; on the last stage `on_output(batch, logits_shard)` is
    called for each micro-batch and its dicts are returned (empty list on other stages).
    `on_batch(batch)` runs on every stage just before each micro-batch's forward (hooks' context,
    progress bars)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model.parameters()).device

    def loss_func(batch, output):
        return output.new_zeros(()), on_output(batch, output)

    def forward_step(data_iterator, model_chunk):
        batch = {k: v.to(device) for k, v in next(data_iterator).items()}
        if on_batch is not None:
            on_batch(batch)
        out = model_chunk(batch["tokens"], batch["position_ids"], None)
        return out, partial(loss_func, batch)

    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )

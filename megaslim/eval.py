"""Held-out loss / perplexity of a (TP/PP/DP-sharded) megatron model on packed rows."""
from __future__ import annotations

import math
import time

import torch

from megaslim.model.expert_parallel import pad_for_expert_parallel
from megaslim.model.forward import make_microbatches, run_forward
from megaslim.model.logits import vocab_parallel_ce
from megaslim.runtime.layout import ParallelLayout


def evaluate_rows(model, rows: torch.Tensor, *, vocab_size: int, micro_batch_size: int) -> dict:
    """Mean next-token loss over every predicted token of `rows` [n, S+1]; rows are split over DP.
    Every rank returns the same numbers."""
    from megatron.core import parallel_state as ps

    t0 = time.time()
    layout = ParallelLayout.from_groups()
    mine = layout.shard_rows(rows)
    seq_length = rows.shape[1] - 1

    def on_output(batch, logits):  # logits [b, s, V/TP]
        loss = vocab_parallel_ce(logits, batch["labels"], vocab_size)
        mask = batch["loss_mask"]
        return {"sum": (loss.double() * mask).sum(), "count": mask.sum().double()}

    batches = make_microbatches(mine, micro_batch_size) if len(mine) else []
    # under EP every DP rank runs as many micro-batches (masked copies count nowhere)
    batches = pad_for_expert_parallel(batches, rows, layout.dp, micro_batch_size)
    outs = run_forward(model, batches, on_output, seq_length=seq_length,
                       micro_batch_size=micro_batch_size) if batches else []
    total = torch.zeros(2, dtype=torch.float64)
    # Only one rank per (last stage, DP replica) contributes, so a world all-reduce gives the total.
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        for o in outs:
            total += torch.stack([o["sum"].cpu(), o["count"].cpu()])
    total = ParallelLayout.all_reduce(total)
    loss = (total[0] / total[1]).item()
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "tokens": int(total[1].item()),
        "seq_length": seq_length,
        "num_samples": int(rows.shape[0]),
        "seconds": time.time() - t0,
    }

"""Worker: block_loss scan (k=2, one block and all sizes up to 2 blocks) and greedy_loss order (k=3) of
SOURCE on ROWS at TP x PP (DP = world / (TP*PP)); every rank saves {"block", "blocks", "greedy"} to
OUT.rank{r} (all ranks must agree).

usage: depth_scores.py SOURCE TP PP ROWS_PT MBS OUT
"""
import sys

import torch
import torch.distributed as dist

from megaslim.config import ModelConfig
from megaslim.importance.depth import block_loss_scores, greedy_loss_order
from megaslim.runtime import init_runtime, main_guard
from megaslim.sources import load_model


def main():
    src, tp, pp, rows_pt, mbs, out = sys.argv[1:7]
    init_runtime(tp=int(tp), pp=int(pp))
    model, arch, _ = load_model(ModelConfig(load=src))
    rows, mbs = torch.load(rows_pt), int(mbs)
    block = block_loss_scores(model, arch, rows, drop=2, micro_batch_size=mbs)
    blocks = block_loss_scores(model, arch, rows, drop=2, blocks=2, micro_batch_size=mbs)
    greedy, records = greedy_loss_order(model, arch, rows, drop=3, micro_batch_size=mbs)
    torch.save({"block": block, "blocks": blocks, "greedy": greedy,
                "removed": [r["removed"] for r in records]}, f"{out}.rank{dist.get_rank()}")


if __name__ == "__main__":
    main_guard(main)

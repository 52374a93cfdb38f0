"""Worker: block_loss scan (k=2) and greedy_loss order (k=3) of SOURCE on ROWS at TP (DP = world / TP);
rank 0 saves {"block", "greedy"}.

usage: depth_scores.py SOURCE TP ROWS_PT MBS OUT
"""
import sys

import torch

from megaslim.config import ModelConfig
from megaslim.importance.depth import block_loss_scores, greedy_loss_order
from megaslim.runtime import init_runtime, main_guard
from megaslim.sources import load_model


def main():
    src, tp, rows_pt, mbs, out = sys.argv[1:6]
    rt = init_runtime(tp=int(tp), pp=1)
    model, arch, _ = load_model(ModelConfig(load=src))
    rows = torch.load(rows_pt)
    block = block_loss_scores(model, arch, rows, drop=2, micro_batch_size=int(mbs))
    greedy, _ = greedy_loss_order(model, arch, rows, drop=3, micro_batch_size=int(mbs))
    if rt.is_rank0:
        torch.save({"block": block, "greedy": greedy}, out)


if __name__ == "__main__":
    main_guard(main)

"""Worker: activation + expert importance of a model source at TP/PP/EP on given rows; rank 0 saves the scores.

usage: moe_importance.py SOURCE TP PP EP ROWS_PT OUT_PT
"""
import sys

import torch

from megaslim.config import ImportanceConfig, ModelConfig
from megaslim.importance.calibrate import activation_scores
from megaslim.runtime import init_runtime, main_guard
from megaslim.sources import load_model


def main():
    src, tp, pp, ep, rows_pt, out_pt = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5], sys.argv[6]
    rt = init_runtime(tp=tp, pp=pp, ep=ep)
    model, arch, _ = load_model(ModelConfig(load=src))
    scores = activation_scores(model, arch, torch.load(rows_pt), ImportanceConfig(), micro_batch_size=2)
    if rt.rank == 0:
        torch.save(scores, out_pt)


if __name__ == "__main__":
    main_guard(main)

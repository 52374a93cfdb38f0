"""Worker: importance scores of SOURCE on ROWS at a TP/PP (DP = world / (TP*PP)); rank 0 saves them.

usage: importance_scores.py SOURCE TP PP ROWS_PT MBS OUT [key=value ...]   (ImportanceConfig fields)
"""
import sys

import torch

from megaslim.config import ImportanceConfig, ModelConfig
from megaslim.importance.calibrate import compute_importance
from megaslim.runtime import init_runtime, main_guard
from megaslim.sources import load_model


def main():
    src, tp, pp, rows_pt, mbs, out = sys.argv[1:7]
    cfg = ImportanceConfig()
    for kv in sys.argv[7:]:
        k, v = kv.split("=", 1)
        setattr(cfg, k, v.split(",") if k == "layer_metrics" else int(v) if v.isdigit() else v)
    rt = init_runtime(tp=int(tp), pp=int(pp))
    model, arch, _ = load_model(ModelConfig(load=src))
    scores, _ = compute_importance(model, arch, torch.load(rows_pt), cfg, micro_batch_size=int(mbs),
                                   transformer_impl="local")
    if rt.is_rank0:
        scores.save(out)


if __name__ == "__main__":
    main_guard(main)

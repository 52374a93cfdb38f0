"""Worker: sparsity masks of SOURCE on ROWS at a TP/PP (DP = world / (TP*PP)), for several settings; each
is written as a checkpoint OUT/<method>_<pattern> whose `sparsity_masks` hold the masks (so a TP=1
process can load and compare them).

usage: sparsity_masks.py SOURCE TP PP ROWS_PT MBS OUT METHOD,PATTERN,RATIO [...]
"""
import sys
from pathlib import Path

import torch

from megaslim import checkpoint as ckpt
from megaslim.config import ModelConfig
from megaslim.runtime import init_runtime, main_guard
from megaslim.sources import load_model
from megaslim.sparsity.apply import compute_masks
from megaslim.sparsity.store import MASKS_KEY, sharded_masks
from megaslim.sparsity.wanda import input_norms


def main():
    src, tp, pp, rows_pt, mbs, out = sys.argv[1:7]
    init_runtime(tp=int(tp), pp=int(pp))
    model, arch, _ = load_model(ModelConfig(load=src))
    rows = torch.load(rows_pt)
    norms = input_norms(model, rows, micro_batch_size=int(mbs))
    for spec in sys.argv[7:]:
        method, pattern, ratio = spec.split(",")
        masks = compute_masks(model, method=method, ratio=float(ratio), pattern=pattern,
                              norms=norms if method == "wanda" else None)
        ckpt.save_checkpoint(model, arch, Path(out) / f"{method}_{pattern.replace(':', '')}", 0,
                             extra={"sparsity": {"method": method, "pattern": pattern, "ratio": float(ratio)}},
                             sharded_extra={MASKS_KEY: sharded_masks(model, masks)})


if __name__ == "__main__":
    main_guard(main)

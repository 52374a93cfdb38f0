"""Worker: load SOURCE at TP/PP and save it as checkpoints ITERS (comma list) into ROOT.

usage: ckpt_save.py SOURCE ROOT TP PP ITERS [--perturb-from N] [--hang-at N MARKER_DIR]
--perturb-from N: from iteration N on, add 1.0 to every weight (so iterations are distinguishable).
--hang-at N DIR: once iteration N's pieces are all written (still in `.partial`), write this rank's
  pid to DIR/rank{R}.pid and sleep, so a test can SIGKILL the job mid-save.
The first saved iteration also carries a small `sharded_extra` tensor (stand-in for optimizer state).
"""
import os
import sys
import time
from pathlib import Path

import torch

from megaslim.config import ModelConfig
from megaslim.runtime import init_runtime, main_guard


def main():
    src, root, tp, pp, iters = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    opts = sys.argv[6:]
    perturb_from = int(opts[opts.index("--perturb-from") + 1]) if "--perturb-from" in opts else None
    hang_at, marker = None, None
    if "--hang-at" in opts:
        i = opts.index("--hang-at")
        hang_at, marker = int(opts[i + 1]), Path(opts[i + 2])
    rt = init_runtime(tp=tp, pp=pp)
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megaslim import checkpoint
    from megaslim.sources import load_model

    model, arch, source = load_model(ModelConfig(load=src))
    for n, it in enumerate(int(x) for x in iters.split(",")):
        if perturb_from is not None and it == perturb_from:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        if it == hang_at:
            real_save = dist_checkpointing.save

            def save_then_hang(*args, real_save=real_save, **kwargs):
                real_save(*args, **kwargs)
                (marker / f"rank{rt.rank}.pid").write_text(str(os.getpid()))
                time.sleep(600)

            dist_checkpointing.save = save_then_hang
        extra = None
        if n == 0:
            dummy = torch.arange(4.0) + rt.rank
            extra = {"optimizer": {"dummy": ShardedTensor.from_rank_offsets(
                "optimizer.dummy", dummy, (0, rt.rank, rt.world_size))}}
        checkpoint.save_checkpoint(model, arch, root, it, tokenizer_dir=source.tokenizer_dir,
                                   extra={"step": it}, sharded_extra=extra)


if __name__ == "__main__":
    main_guard(main)

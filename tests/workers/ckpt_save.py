"""Worker: load SOURCE at TP/PP and save it as checkpoints ITERS (comma list) into ROOT.

usage: ckpt_save.py SOURCE ROOT TP PP ITERS [--perturb-from N] [--hang-at N MARKER_DIR] [--disk-full-at N R]
--perturb-from N: from iteration N on, add 1.0 to every weight (so iterations are distinguishable).
--hang-at N DIR: once iteration N's pieces are all written (still in `.partial`), write this rank's
  pid to DIR/rank{R}.pid and sleep, so a test can SIGKILL the job mid-save.
--disk-full-at N R: in the save of iteration N, rank R's checkpoint writer (megatron's writer processes,
  forked from this one) finds the disk full: each data file takes 256 bytes, then ENOSPC.
The first saved iteration also carries a small `sharded_extra` tensor (stand-in for optimizer state).
"""
import errno
import os
import sys
import time
from pathlib import Path

import torch

from megaslim.config import ModelConfig
from megaslim.runtime import init_runtime, main_guard


class _FullDisk:
    """A file opened for writing on a disk that takes `room` more bytes (then ENOSPC, as write(2) says)."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self._room:
            self._f.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._f.name)
        self._room -= len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def fill_disk_in_writer() -> None:
    """Where megatron's torch_dist writer opens its data files, hand it files on a full disk."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def full_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return _FullDisk(f, 256) if "w" in mode else f

    filesystem_async.open = full_open  # the writer's module-level name for the builtin


def main():
    src, root, tp, pp, iters = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    opts = sys.argv[6:]
    perturb_from = int(opts[opts.index("--perturb-from") + 1]) if "--perturb-from" in opts else None
    hang_at, marker = None, None
    if "--hang-at" in opts:
        i = opts.index("--hang-at")
        hang_at, marker = int(opts[i + 1]), Path(opts[i + 2])
    full_at, full_rank = None, None
    if "--disk-full-at" in opts:
        i = opts.index("--disk-full-at")
        full_at, full_rank = int(opts[i + 1]), int(opts[i + 2])
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
        if it == full_at and rt.rank == full_rank:
            fill_disk_in_writer()
        extra = None
        if n == 0:
            dummy = torch.arange(4.0) + rt.rank
            extra = {"optimizer": {"dummy": ShardedTensor.from_rank_offsets(
                "optimizer.dummy", dummy, (0, rt.rank, rt.world_size))}}
        checkpoint.save_checkpoint(model, arch, root, it, tokenizer_dir=source.tokenizer_dir,
                                   extra={"step": it}, sharded_extra=extra)


if __name__ == "__main__":
    main_guard(main)

"""Worker: rank 1 raises while rank 0 waits in a collective; the job must end quickly and non-zero."""
import os

import torch
import torch.distributed as dist

from megaslim.runtime import init_runtime, main_guard


def main():
    init_runtime()
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.all_reduce(torch.ones(1))  # would wait for the gloo timeout (30 min) without the guard
    print("unreachable", os.getpid())


if __name__ == "__main__":
    main_guard(main)

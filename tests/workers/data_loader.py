"""Worker: every rank builds the GPTDataset through megatron's builder (rank 0 writes the index cache,
the others read it after a barrier) and saves its DP micro-batches.

usage: data_loader.py PREFIX TOKENIZER_DIR CACHE_DIR OUT_DIR SEQ MBS GBS ITERS SEED
"""
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from megaslim.data.loaders import train_micro_batches
from megaslim.runtime import main_guard


def main():
    prefix, tok_dir, cache, out = sys.argv[1:5]
    seq, mbs, gbs, iters, seed = map(int, sys.argv[5:10])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    batches = list(train_micro_batches(prefix, tokenizer, seq_length=seq, micro_batch_size=mbs,
                                       global_batch_size=gbs, train_iters=iters, dp_rank=rank,
                                       dp_size=world, seed=seed, cache_path=cache))
    torch.save(batches, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main_guard(main)

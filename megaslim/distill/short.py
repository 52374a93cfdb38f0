"""A short distillation of one student (the shape search's light retraining): a few steps, then its held-out loss."""
from __future__ import annotations

import copy
from pathlib import Path

from megaslim.config import Config
from megaslim.data.loaders import train_micro_batches
from megaslim.distill.train import Models, Trainer, step_batches
from megaslim.model.arch import ModelArch


def short_distill(cfg: Config, student, student_arch: ModelArch, teacher, teacher_arch: ModelArch, eval_rows,
                  train_prefix, tokenizer, out_dir: Path) -> float:
    """`prune.search.train_iters` steps of the configured distillation from `teacher` (run under
    `out_dir`, no resume); the student's held-out loss on `eval_rows` after."""
    from megatron.core import parallel_state as ps

    iters = cfg.prune.search.train_iters
    c = copy.deepcopy(cfg)
    c.output_dir, c.resume = str(out_dir), False
    c.train.train_iters, c.train.lr_decay_iters = iters, None
    c.train.warmup_iters = min(c.train.warmup_iters, iters // 2)  # a high peak LR without warmup hurts
    t = c.train
    trainer = Trainer(c, Models(student, student_arch, teacher, teacher_arch), tokenizer_dir=None,
                      eval_rows=eval_rows)
    # the same batches (same seed) for every candidate: a fair comparison
    data = train_micro_batches(train_prefix, tokenizer, seq_length=c.data.seq_length,
                               micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                               train_iters=iters, dp_rank=ps.get_data_parallel_rank(),
                               dp_size=ps.get_data_parallel_world_size(), seed=t.seed, consumed_samples=0,
                               cache_path=Path(cfg.output_dir) / "search" / "data_cache")
    for _ in range(iters):
        trainer.train_step(step_batches(data, trainer.num_micro))
    return trainer.evaluate(student, student_arch)["loss"]

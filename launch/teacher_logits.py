"""Offline teacher logits: run the teacher once over the samples a distillation run will read and
store its top-k log-probs (k = distill.top_k), so distillation can run without the teacher.

torchrun --nproc-per-node N launch/teacher_logits.py --config CONFIG [key.sub=value ...] \
    [offline.dtype=float32|float16|bfloat16] [offline.samples_per_shard=256]
The teacher is distill.teacher.load (or model.load); the samples are those of data.train_path with
data.seq_length, train.train_iters x train.global_batch_size and train.seed -- use the same values in
the distillation run. Outputs in <output_dir>: teacher_logits.json (index, written last), shards/
(safetensors), tokenizer/; output_dir must be visible to every rank (shared filesystem on multi-node
jobs). Any TP/PP/DP may compute them and any TP/PP/DP may distill from them. Then distill with
    launch/distill.py ... distill.teacher.load=<output_dir> distill.kl=topk distill.student.load=STUDENT
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from megaslim.commands import cli, teacher_logits  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402

if __name__ == "__main__":  # --check: the checks before compute only (no process group, no weights)
    main_guard(lambda: cli.main_or_check(teacher_logits.main, teacher_logits.validate, sys.argv[1:]))

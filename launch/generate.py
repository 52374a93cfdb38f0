"""Synthetic data: the teacher continues prompts drawn from the corpus into a JSONL corpus
({"text", "prompt", "completion", ...} per line) for plain-LM training of the student.

torchrun --nproc-per-node N launch/generate.py --config CONFIG [key.sub=value ...] \
    [generate.num_prompts=64] [generate.prompt_length=32] [generate.max_new_tokens=64] \
    [generate.temperature=0.8] [generate.top_p=0.95] [generate.batch_size=8] [generate.seed=S] \
    [generate.prompts_path=FILE] [generate.output=FILE] [generate.kv_cache=true]
The teacher is distill.teacher.load (or model.load); prompts are windows of data.train_path (or the
documents of generate.prompts_path). TP and DP are supported, PP must be 1. Outputs: the JSONL
(default <output_dir>/synthetic.jsonl, written atomically) and <output_dir>/generate.json. Then train
the student on it with plain LM loss:
    launch/distill.py ... data.train_path=<output_dir>/synthetic.jsonl distill.kd_loss_scale=0 \
        distill.skip_lm_loss=false distill.student.load=STUDENT
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from megaslim.commands import cli, generate  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402

if __name__ == "__main__":  # --check: the checks before compute only (no process group, no weights)
    main_guard(lambda: cli.main_or_check(generate.main, generate.validate, sys.argv[1:]))

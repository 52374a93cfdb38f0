"""Minitron pruning: importance scores from calibration activations, then width/depth pruning.

torchrun --nproc-per-node N launch/prune.py --config CONFIG [key.sub=value ...]
`importance.only=true` computes and saves the scores and plots without pruning.
Outputs in <output_dir>: importance.safetensors + importance_*.png, prune_plan.json, eval_before.json,
eval.json, checkpoint/ (torch_dist), export.hf_dir if set, prune.json (summary).
`prune.iterative=N` (N > 1, source PP=1) prunes in N steps, re-scoring before each: it also writes
importance_step{i}.safetensors and prune_plan_steps.json (the chain; prune_plan.json is their composition).
`prune.fold_heads=true` folds pruned heads into kept heads of their query group (`prune.fold_mode`:
proj_sum, the measured best, or laco; docs/pruning.md).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaslim.commands import cli, prune  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402

if __name__ == "__main__":  # --check: the checks before compute only (no process group, no weights)
    main_guard(lambda: cli.main_or_check(prune.main, prune.check, sys.argv[1:]))

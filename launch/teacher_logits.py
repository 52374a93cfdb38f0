"""Launcher of `megaslim.commands.teacher_logits`, whose docstring is the manual (also `--help`).

torchrun --nproc-per-node N launch/teacher_logits.py --config CONFIG [key.sub=value ...] \
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from megaslim.commands import cli, teacher_logits  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402

if __name__ == "__main__":  # --check: the checks before compute only (no process group, no weights)
    main_guard(lambda: cli.main_or_check(teacher_logits.main, teacher_logits.validate, sys.argv[1:]))

"""Launcher of `megaslim.commands.evaluate`, whose docstring is the manual (also `--help`).

torchrun --nproc-per-node N launch/evaluate.py --config CONFIG [key.sub=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from megaslim.commands import cli, evaluate  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402

if __name__ == "__main__":  # --check: the checks before compute only (no process group, no weights)
    main_guard(lambda: cli.main_or_check(evaluate.main, evaluate.validate, sys.argv[1:]))

"""Launcher of `megaslim.commands.distill`, whose docstring is the manual (also `--help`).

torchrun --nproc-per-node N launch/distill.py --config CONFIG [key.sub=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaslim.runtime import main_guard  # noqa: E402


def main():
    from megaslim.commands import cli, distill  # after sys.path is set

    # --check: the checks before compute only (no process group, no weights)
    cli.main_or_check(distill.main, distill.validate, sys.argv[1:])


if __name__ == "__main__":
    main_guard(main)

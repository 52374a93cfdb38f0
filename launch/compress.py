"""Launcher of `megaslim.commands.compress` and, with --dry-run, `megaslim.commands.plan` (their
docstrings are the manuals; also `--help`).

torchrun --nproc-per-node N launch/compress.py --config CONFIG [key.sub=value ...]
python launch/compress.py --config CONFIG --dry-run [--nodes N] [--gpus-per-node G] ... [key.sub=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaslim.commands import cli, compress, plan  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402


def main():
    # --check: the checks before compute only (no process group, no weights)
    cli.main_or_check(compress.main, compress.check, sys.argv[1:])


if __name__ == "__main__":
    if plan.wants_dry_run(sys.argv[1:]):
        plan.main(sys.argv[1:])  # no process group: its own one-line errors, no distributed teardown
    else:
        main_guard(main)

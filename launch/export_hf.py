"""Launcher of `megaslim.commands.export_hf`, whose docstring is the manual (also `--help`).

torchrun --nproc-per-node N launch/export_hf.py --config CONFIG export.hf_dir=OUT [key.sub=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from megaslim.commands import cli, export_hf  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402

if __name__ == "__main__":  # --check: the checks before compute only (no process group, no weights)
    main_guard(lambda: cli.main_or_check(export_hf.main, export_hf.validate, sys.argv[1:]))

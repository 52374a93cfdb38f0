"""Launcher of `megaslim.commands.preprocess_data`, whose docstring is the manual (also `--help`).

python launch/preprocess_data.py [--config CONFIG] [key.sub=value ...] [--workers N] [--overwrite]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from megaslim.commands import preprocess_data  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402

if __name__ == "__main__":
    main_guard(preprocess_data.main)

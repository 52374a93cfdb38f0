"""Entry point kept for the documented command `python bench/minitron_table.py ...` (bench/minitron/cli.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable
from bench.minitron.cli import main

main()

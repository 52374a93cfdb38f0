"""Compress a model the Minitron way: rounds of importance -> prune -> distill -> HF export.

torchrun --nproc-per-node N launch/compress.py --config CONFIG [key.sub=value ...]
Targets: compress.rounds (a list of shapes) or prune.export_config (one round). Outputs in
<output_dir>: round<N>/{prune,distill,hf}/, compress.json, family.png. A rerun skips finished stages.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaslim import cli  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402


def main():
    from megaslim.compress import run

    run(cli.parse_args(__doc__))


if __name__ == "__main__":
    main_guard(main)

"""Command plumbing: `--config FILE key.sub=value ...`, runtime start, the saved run config."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from megaslim.config import Config, load_config, to_yaml
from megaslim.io import atomic_write_text
from megaslim.report import is_rank0


def parse_args(description: str, argv: Optional[Sequence[str]] = None) -> Config:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (schema: megaslim/config.py)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor_model_parallel_size=2")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def start(cfg: Config):
    """Initialise distributed + model parallel for `cfg` (call after all input checks)."""
    from megaslim.runtime import init_runtime

    return init_runtime(
        tp=cfg.parallel.tensor_model_parallel_size,
        pp=cfg.parallel.pipeline_model_parallel_size,
        seed=cfg.train.seed,
    )


def save_run_config(cfg: Config) -> None:
    if is_rank0():
        atomic_write_text(Path(cfg.output_dir) / "config.yaml", to_yaml(cfg))

"""Shared launcher plumbing: `--config FILE key.sub=value ...`, runtime init, tables, JSON results."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

from megaslim.config import Config, load_config, to_yaml


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


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write via a temporary file and rename, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: dict) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def save_run_config(cfg: Config) -> None:
    if is_rank0():
        atomic_write_text(Path(cfg.output_dir) / "config.yaml", to_yaml(cfg))


def summary_table(title: str, rows: list[tuple[str, object]]) -> None:
    """Print a two-column summary table on rank 0."""
    if not is_rank0():
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in rows:
        table.add_row(str(key), _fmt(value))
    Console().print(table)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


class Timer:
    def __init__(self):
        self.t0 = time.time()

    @property
    def seconds(self) -> float:
        return time.time() - self.t0

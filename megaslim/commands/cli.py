"""Command plumbing: `--config FILE key.sub=value ...`, runtime start, the saved run config."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence

from megaslim.config import Config, load_config, to_yaml
from megaslim.io import atomic_write_text
from megaslim.report import is_rank0

CHECK_HELP = ("only check: the config, the model sources (their config.json, not the weights), the data and "
              "the outputs, then exit 0 with 'ok: ...' or 2 with the error; no process group, nothing written")


def parse_args(description: str, argv: Optional[Sequence[str]] = None, *,
               check: Optional[Callable[[Config], object]] = None) -> Config:
    """The config of `--config FILE key.sub=value ...`. With `check` (the command's checks before compute)
    the command takes `--check`: run them, say ok and exit."""
    # the command's docstring is its manual: keep its lines as written
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (schema: megaslim/config/schema.py)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor_model_parallel_size=2")
    parser.add_argument("--check", action="store_true", help=CHECK_HELP)
    args = parser.parse_args(argv)
    if args.check and check is None:
        parser.error("--check: run it through the command's launcher (launch/<command>.py --check ...)")
    cfg = load_config(args.config, args.overrides)
    if args.check:
        check_only(cfg, check, command=check.__module__.rsplit(".", 1)[-1])
    return cfg


def main_or_check(main: Callable[[Sequence[str]], object], check: Callable[[Config], object],
                  argv: Sequence[str]) -> None:
    """A launcher's body: `--check` runs the command's `check` only, anything else its `main`."""
    if "--check" in argv:
        parse_args(sys.modules[check.__module__].__doc__, argv, check=check)
    main(argv)


def check_only(cfg: Config, check: Callable[[Config], object], *, command: str) -> NoReturn:
    """`--check`: the command's checks before compute; a MegaslimError goes to the launcher's one line."""
    check(cfg)
    if is_rank0():
        print(f"ok: {command}: config, sources, data and outputs check out for output_dir={cfg.output_dir} "
              "(nothing loaded or written)", flush=True)
    raise SystemExit(0)


def start(cfg: Config):
    """Initialise distributed + model parallel for `cfg` (call after all input checks)."""
    from megaslim.runtime import init_runtime

    return init_runtime(
        tp=cfg.parallel.tensor_model_parallel_size,
        pp=cfg.parallel.pipeline_model_parallel_size,
        ep=cfg.parallel.expert_model_parallel_size,
        seed=cfg.train.seed,
    )


def save_run_config(cfg: Config) -> None:
    if is_rank0():
        atomic_write_text(Path(cfg.output_dir) / "config.yaml", to_yaml(cfg))

"""The run settings: the --small preset, the defaults read from the config, the run-directory tag."""
from __future__ import annotations

import hashlib
from pathlib import Path

from megaslim.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "smollm2_cpu.yaml"

# --small preset (2 CPU cores). SMALL_TOKENS is T, from measurements on the 2-core dev machine (seq 128,
# micro-batch 8 = 1024 tokens/step): logit KD of the width student ~155 tokens/s when the machine is quiet
# (~6.5 s/step; 60-70 tokens/s while other jobs share the cores), LM-only steps ~1.6x cheaper (no teacher
# forward), ~40 s of fixed cost per distill run, ~30 s per prune. At T = 8192 (8 steps; 10T = 80 steps)
# all 23 rows add up to ~40 minutes on a quiet machine (estimate in the PR note).
SMALL_SEQ, SMALL_EVAL_ROWS, SMALL_TOKENS = 128, 32, 8192


def resolve_settings(args) -> None:
    """Fill the preset-dependent defaults of `args` from --small and the config."""
    cfg = load_config(args.config)
    t = cfg.train
    args.seq_length = args.seq_length or (SMALL_SEQ if args.small else cfg.data.seq_length)
    args.eval_rows = args.eval_rows or (SMALL_EVAL_ROWS if args.small else 64)
    args.tokens_per_step = t.global_batch_size * args.seq_length
    args.tokens = args.tokens or (SMALL_TOKENS if args.small else t.train_iters * args.tokens_per_step)
    args.warmup, args.lr, args.min_lr = t.warmup_iters, t.lr, t.min_lr
    args.micro_batch_size, args.global_batch_size = t.micro_batch_size, t.global_batch_size
    if args.eval_path:
        args.eval_path = str(Path(args.eval_path).resolve())


def settings_tag(args) -> str:
    """Run-directory name for the settings every stage depends on."""
    tag = f"seq{args.seq_length}_T{args.tokens}_eval{args.eval_rows}_depth{args.depth_layers}"
    extra = [str(Path(args.config).resolve())] if Path(args.config).resolve() != DEFAULT_CONFIG else []
    extra += [args.eval_path] if args.eval_path else []
    if extra:
        tag += "_" + hashlib.sha1("\n".join(extra).encode()).hexdigest()[:8]
    return tag

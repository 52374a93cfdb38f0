"""Held-out loss / perplexity of `model.load` on `data.eval_path` at any TP/PP/DP.

torchrun --nproc-per-node N launch/evaluate.py --config CONFIG [key.sub=value ...]
Writes <output_dir>/eval.json (loss, ppl, tokens, seq_length, num_samples).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from megaslim import io as mio
from megaslim import report
from megaslim.commands import cli
from megaslim.config import Config, check_output_dir_writable
from megaslim.data.heldout import heldout_rows
from megaslim.eval import evaluate_rows
from megaslim.model.arch import check_parallel_layout
from megaslim.runtime import ParallelLayout
from megaslim.sources import check_positions, load_model, resolve_source, source_arch
from megaslim.tokenizer import load_tokenizer

RESULT = "eval.json"


def validate(cfg: Config) -> dict:
    """Every input check and the held-out rows, before any process group exists."""
    check_output_dir_writable(cfg.output_dir)
    source = resolve_source(cfg.model.load)
    arch = source_arch(source)
    # The model's fit before the world size: its message names the TP sizes that fit the model.
    check_parallel_layout(arch, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    layout = ParallelLayout.from_config(cfg)
    check_positions(arch, cfg.data.seq_length)  # after the layout: its errors come first
    tokenizer = load_tokenizer(cfg.model, source)
    rows = heldout_rows(cfg.data.eval_path, tokenizer, seq_length=cfg.data.seq_length,
                        num_samples=cfg.eval.num_samples)
    return dict(source=source, layout=layout, rows=rows)


def run(cfg: Config) -> dict:
    """Evaluate, write <output_dir>/eval.json (writer rank); returns the result."""
    timer = report.Timer()
    p = validate(cfg)
    cli.start(cfg)
    model, arch, _ = load_model(cfg.model, p["source"])
    result = evaluate_rows(model, p["rows"], vocab_size=arch.vocab_size, micro_batch_size=cfg.data.micro_batch_size)
    lay = p["layout"]
    result.update(model=p["source"].label, eval_path=str(cfg.data.eval_path or "default valid split"),
                  tp=lay.tp, pp=lay.pp, dp=lay.dp, params=arch.num_params())
    out = Path(cfg.output_dir) / RESULT
    if lay.is_writer():
        mio.write_json(out, result)
    report.summary_table("megaslim evaluate", [
        ("model", p["source"].label), ("params", arch.num_params()),
        ("layout", f"TP={lay.tp} PP={lay.pp} DP={lay.dp}"),
        ("rows x seq_length", f"{result['num_samples']} x {result['seq_length']}"),
        ("tokens", result["tokens"]), ("loss", result["loss"]), ("ppl", result["ppl"]),
        ("seconds", round(timer.seconds, 1)), ("results", out),
    ])
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(cli.parse_args(__doc__, argv))

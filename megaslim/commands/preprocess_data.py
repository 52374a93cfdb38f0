"""Tokenize text/JSONL corpora into megatron indexed datasets (PREFIX.bin + PREFIX.idx).

python launch/preprocess_data.py [--config CONFIG] [key.sub=value ...] [--workers N] [--overwrite]
    data.train_path -> <output_dir>/train, data.eval_path -> <output_dir>/valid (unset: the
    default corpus splits); point data.* at the written prefixes afterwards.
python launch/preprocess_data.py --input FILE --output-prefix PREFIX [...]   one file only
The tokenizer is model.tokenizer, else the one of model.load. Writes <output_dir>/preprocess.json.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

from megaslim import io as mio
from megaslim import report
from megaslim.commands.cli import CHECK_HELP
from megaslim.config import Config, check_output_dir_writable, load_config
from megaslim.data.corpora import data_path
from megaslim.data.indexed import as_prefix, write_indexed
from megaslim.data.packing import read_documents
from megaslim.errors import MegaslimError
from megaslim.sources import resolve_source
from megaslim.tokenizer import load_tokenizer

RESULT = "preprocess.json"


def parse(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (schema: megaslim/config.py)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.train_path=corpus.jsonl")
    parser.add_argument("--input", help="one .jsonl (field \"text\") or .txt file, instead of the data.* keys")
    parser.add_argument("--output-prefix", help="with --input: where PREFIX.bin/.idx go")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="tokenizer processes (default: min(8, cores))")
    parser.add_argument("--overwrite", action="store_true", help="replace existing PREFIX.bin/.idx")
    parser.add_argument("--check", action="store_true", help=CHECK_HELP)
    args = parser.parse_args(argv)
    if (args.input is None) != (args.output_prefix is None):
        parser.error("--input and --output-prefix go together")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return args, load_config(args.config, args.overrides)


def jobs(args: argparse.Namespace, cfg: Config) -> list[tuple[str, Path, Path]]:
    """(what, input file, output prefix) to write, all checked before any tokenization."""
    if args.input is not None:
        todo = [("--input", Path(args.input), Path(args.output_prefix))]
    else:
        out = Path(cfg.output_dir)
        todo = [(key, data_path(getattr(cfg.data, key.split(".")[1]), key), out / name)
                for key, name in (("data.train_path", "train"), ("data.eval_path", "valid"))]
    for what, src, prefix in todo:
        if as_prefix(src) is not None:
            raise MegaslimError(f"{what}={src} is already an indexed dataset; nothing to preprocess")
        if not src.is_file() or src.suffix not in (".jsonl", ".txt"):
            raise MegaslimError(f"{what}={src}: expected an existing .jsonl (field \"text\") or .txt file")
        check_output_dir_writable(prefix.parent, "--output-prefix" if args.input is not None else "output_dir")
        existing = [p for p in (Path(f"{prefix}.bin"), Path(f"{prefix}.idx")) if p.exists()]
        if existing and not args.overwrite:
            raise MegaslimError(f"{existing[0]} already exists; pass --overwrite or choose another output")
    return todo


def check(args: argparse.Namespace, cfg: Config):
    """(jobs, tokenizer source, tokenizer): every check before any tokenization."""
    todo = jobs(args, cfg)
    source = resolve_source(cfg.model.load) if cfg.model.tokenizer is None else None
    return todo, source, load_tokenizer(cfg.model, source)


def run(cfg: Config, args: argparse.Namespace) -> dict:
    """Tokenize every job into PREFIX.bin/.idx and write preprocess.json; returns its content."""
    timer = report.Timer()
    todo, source, tokenizer = check(args, cfg)
    results = []
    for what, src, prefix in todo:
        stats = write_indexed(read_documents(src), tokenizer, prefix, workers=args.workers,
                              desc=f"tokenizing {src.name}")
        results.append({"key": what, "input": str(src), **stats})
    out_dir = Path(cfg.output_dir) if args.input is None else Path(args.output_prefix).parent
    summary = {"tokenizer": str(cfg.model.tokenizer or source.tokenizer_dir),
               "vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id, "outputs": results}
    results_path = mio.write_json(out_dir / RESULT, summary)
    rows = [("tokenizer", cfg.model.tokenizer or source.label), ("workers", args.workers)]
    for r in results:
        rows.append((r["key"], f"{r['input']} -> {r['prefix']}.{{bin,idx}}"))
        rows.append(("  documents / tokens", f"{r['documents']:,} / {r['tokens']:,}"))
    rows += [("seconds", round(timer.seconds, 1)), ("results", results_path)]
    report.summary_table("megaslim preprocess_data", rows)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args, cfg = parse(argv)
    if args.check:
        todo = check(args, cfg)[0]
        print(f"ok: preprocess_data: {len(todo)} input(s) and their outputs check out (nothing written)", flush=True)
        raise SystemExit(0)
    return run(cfg, args)

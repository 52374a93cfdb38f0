"""Command line of the Minitron table: the paper's comparisons on the embedded SmolLM2-135M, every student
the same size.

python bench/minitron_table.py --small                      # the 2-CPU-core preset (docs/results.md)
python bench/minitron_table.py --small --rows width_kd,depth_kd --tokens 2048 --no-docs   # a quick check
python bench/minitron_table.py --list                       # the row ids
(`python -m bench.minitron ...` is the same command.)

Rows (data: bench/minitron/rows.py): the teacher; width (hidden 576->468, ffn 1536->750) with no
retraining / LM-loss retraining / logit KD / logit+intermediate KD / synthetic-data fine-tuning, T tokens
each; depth (30->15 layers) with no retraining / logit KD / logit+intermediate KD; iterative (two
prune->distill rounds of T/2 through launch/compress.py) vs one-shot; head folding on vs off (6 heads, ffn
642); the width shape from random init trained with LM loss on T and 10T tokens; contrastive
intermediate loss; 50% unstructured (magnitude, Wanda) and 2:4 (Wanda) sparsity without retraining and
with logit KD T. Every stage runs the real launchers (launch/prune.py, distill.py,
generate.py, compress.py) as subprocesses with configs/smollm2_cpu.yaml plus overrides; importance is
computed once and reused. Every model is then scored on the same held-out rows (the pinned protocol of
launch/evaluate.py, one row at a time through megaslim.eval.evaluate_rows) so each row has per-row losses:
the table gives the loss, PPL, a standard error over rows and a paired SE of the difference to the
reference row. Verdicts on the paper's claims are generated from those numbers (2-SE rule).

Outputs: run directories under --out-dir (default /tmp/megaslim_table; finished stages are reused on a
rerun), docs/results.md, docs/results.json, docs/results_loss_curves.png.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench.minitron.report import plot_curves, render_markdown
from bench.minitron.rows import DEPTH_LAYERS, REFERENCE, ROWS, select_rows, steps_for
from bench.minitron.runner import Bench
from bench.minitron.settings import DEFAULT_CONFIG, ROOT, SMALL_EVAL_ROWS, SMALL_SEQ, SMALL_TOKENS, resolve_settings
from bench.minitron.stats import claim_verdicts, measured_effects
from megaslim.io import atomic_write_text, write_json

COMMAND = "python bench/minitron_table.py"  # the documented command, recorded in results.md


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help=f"2-CPU-core preset: seq {SMALL_SEQ}, "
                    f"{SMALL_EVAL_ROWS} eval rows, T = {SMALL_TOKENS} tokens")
    ap.add_argument("--tokens", type=int, help="T, training tokens per 'T' row (default: --small "
                    f"{SMALL_TOKENS}; else the config's train_iters x global batch x seq)")
    ap.add_argument("--eval-path", help="held-out .jsonl (\"text\") / .txt (default: the default valid split)")
    ap.add_argument("--eval-rows", type=int, help=f"held-out rows (default: --small {SMALL_EVAL_ROWS}; else 64)")
    ap.add_argument("--seq-length", type=int, help=f"default: --small {SMALL_SEQ}; else the config's")
    ap.add_argument("--rows", help="comma-separated row ids or globs (e.g. 'teacher,width_*'); default all")
    ap.add_argument("--depth-layers", type=int, default=DEPTH_LAYERS)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--out-dir", default="/tmp/megaslim_table", help="run outputs (reused on a rerun)")
    ap.add_argument("--docs-dir", default=str(ROOT / "docs"), help="where results.md/.json/_loss_curves.png go")
    ap.add_argument("--no-docs", action="store_true", help="write the results into --out-dir only")
    ap.add_argument("--retry-failed", action="store_true", help="rerun stages that failed or were refused before")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="OMP_NUM_THREADS")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    return ap.parse_args(argv)


def machine() -> str:
    """Cores, CPU model, GPU and torch version, for the results header."""
    import torch  # heavy; only once the table is written, never for --help / --list

    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or str(os.cpu_count())
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{nproc} cores (nproc), {model}{gpu}, torch {torch.__version__}"


def run_meta(args, argv, wall_seconds: float) -> dict:
    """results.json's "meta": how the table was made (command, machine, settings)."""
    steps_T = steps_for(args.tokens, args.tokens_per_step)
    return {"command": COMMAND + " " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "machine": machine(), "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "wall_seconds": wall_seconds, "tokens": steps_T * args.tokens_per_step, "steps_T": steps_T,
            "tokens_per_step": args.tokens_per_step, "seq_length": args.seq_length,
            "micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size,
            "lr": args.lr, "min_lr": args.min_lr, "eval_rows": args.eval_rows,
            "eval_path": args.eval_path or "the default validation split",
            "config": os.path.relpath(args.config, ROOT), "depth_layers": args.depth_layers,
            "out_dir": str(args.out_dir)}


def write_results(doc: dict, docs: Path) -> str:
    """results_loss_curves.png, results.json and results.md into `docs`; returns the markdown."""
    if plot_curves(doc["rows"], docs / "results_loss_curves.png") is None:
        doc["notes"] = ["no distillation run finished: no loss curves"]
    write_json(docs / "results.json", doc)
    text = render_markdown(doc)
    atomic_write_text(docs / "results.md", text)
    return text


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.list:
        for r in ROWS:
            print(f"{r.id:18s} {r.label}")
        return
    rows = select_rows(args.rows)
    resolve_settings(args)
    t0 = time.time()
    results = Bench(args).run(rows)
    doc = {"meta": run_meta(args, argv, time.time() - t0), "reference": REFERENCE,
           "order": [r.id for r in rows], "rows": results, "claims": claim_verdicts(results),
           "effects": measured_effects(results)}
    print(write_results(doc, Path(args.out_dir) if args.no_docs else Path(args.docs_dir)))

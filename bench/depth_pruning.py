"""Benchmark: SmolLM2-135M depth-pruned 30 -> 15 layers without retraining, by prune.layer_metric.

python bench/depth_pruning.py [--calib-rows 32] [--loss-rows 8] [--greedy-rows 8] [--eval-rows 32]
Model and target from configs/smollm2_prune_depth.yaml. Calibration: two disjoint draws of rows of the
default corpus's train split (Shakespeare + KJV Bible). Evaluation: held-out text of another kind (the
license texts of /usr/share/common-licenses: legal English, never calibrated on) and the corpus's valid split
(Hamlet, Macbeth, three Bible books). Each method's plan is built by megaslim.prune.plan.build_plan from its
scores; losses come from the pruned layer list (equal to the pruned model's loss to 1e-5, tests/test_depth.py).
Writes docs/bench_depth.md (raw results under outputs/; `--render FILES` merges runs of separate processes,
e.g. one per draw or method). Cost in full forward passes of one row: per draw, bi 1 x rows, block_loss about
8 x rows, loss 19 x loss-rows (from the cache), greedy_loss about 67 x greedy-rows, each evaluation 0.6 x rows.
"""
import argparse
import json
import math
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from megaslim.config import ImportanceConfig, load_config
from megaslim.data.calibration import calibration_rows
from megaslim.data.heldout import heldout_rows
from megaslim.data.packing import pack_rows
from megaslim.importance.calibrate import activation_scores
from megaslim.importance.depth import LayerRunner, _batches, block_loss_scores, greedy_loss_order
from megaslim.importance.scores import ImportanceScores
from megaslim.io import atomic_write_text
from megaslim.prune.plan import build_plan
from megaslim.runtime import init_runtime
from megaslim.sources import load_model, resolve_source
from megaslim.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LICENSES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-3", "Artistic", "GPL-2", "LGPL-2.1")
METHODS = ("bi", "loss", "block_loss", "greedy_loss")
SHORTGPT_REFERENCE = 9.63  # issue 19: ShortGPT BI on the issue author's held-out text


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2_prune_depth.yaml"))
    ap.add_argument("--calib-rows", type=int, default=32, help="rows per calibration draw (bi, block_loss)")
    ap.add_argument("--loss-rows", type=int, default=8, help="rows of each draw for the per-layer loss metric")
    ap.add_argument("--greedy-rows", type=int, default=8, help="rows of each draw for greedy_loss")
    ap.add_argument("--eval-rows", type=int, default=32)
    ap.add_argument("--valid-rows", type=int, default=16, help="rows of the default valid split")
    ap.add_argument("--greedy-draws", default="AB", help="the draws greedy_loss runs on (it costs the most)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated layer metrics to run")
    ap.add_argument("--draws", default="AB", help="the calibration draws this process runs (A, B or AB)")
    ap.add_argument("--render", nargs="*", help="only merge these result JSON files into --out")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_depth.md"))
    return ap.parse_args(argv)


def license_rows(tokenizer, seq_length: int, n: int) -> torch.Tensor:
    docs = [Path("/usr/share/common-licenses", name).read_text() for name in LICENSES]
    return pack_rows(docs, tokenizer, seq_length=seq_length, num_rows=n, what="license texts")


def row_losses(runner: LayerRunner, rows: torch.Tensor, keep: list[int], mbs: int) -> torch.Tensor:
    """[n] mean token loss of each row through the kept layers only."""
    out = []
    with torch.no_grad():
        for batch in _batches(rows, mbs):
            c = runner.cache(batch, keep)
            out.append(runner.row_losses(c, c.states[len(keep)]))
    return torch.cat(out)[: len(rows)]


def method_scores(model, arch, draw: torch.Tensor, args, drop: int, greedy: bool) -> dict:
    """{method: (ImportanceScores with that method's tensor, seconds)} on one calibration draw, for the
    methods of args.methods (greedy_loss only where `greedy`)."""
    L = arch.num_layers  # widths stay: their scores only need the right shapes
    zeros = dict(heads=torch.zeros(L, arch.num_attention_heads), query_groups=torch.zeros(L, arch.num_query_groups),
                 neurons=torch.zeros(L, arch.ffn_hidden_size), channels=torch.zeros(arch.hidden_size),
                 layer_bi=torch.zeros(L))
    wanted, out = args.methods.split(","), {}

    def timed(name, fn):
        if name in wanted and (name != "greedy_loss" or greedy):
            t0 = time.time()
            extra = fn()
            out[name] = (ImportanceScores(**{**zeros, **extra}), time.time() - t0)

    timed("bi", lambda: {"layer_bi": activation_scores(model, arch, draw, ImportanceConfig(),
                                                       micro_batch_size=args.micro_batch)["layer_bi"]})
    # the same numbers as layer_loss_scores (one skipped layer each; tests/test_depth.py), ~40% cheaper
    timed("loss", lambda: {"layer_loss": block_loss_scores(model, arch, draw[: args.loss_rows], drop=1,
                                                           micro_batch_size=args.micro_batch)[0]})
    timed("block_loss", lambda: {"layer_block_loss": block_loss_scores(
        model, arch, draw, drop=drop, micro_batch_size=args.micro_batch),
        "settings": {"block_drop": drop, "layer_blocks": 1}})
    timed("greedy_loss", lambda: {"layer_greedy": greedy_loss_order(
        model, arch, draw[: args.greedy_rows], drop=drop, micro_batch_size=args.micro_batch)[0]})
    return out


def measure(args) -> dict:
    cfg = load_config(args.config, [])
    init_runtime()
    source = resolve_source(cfg.model.load)
    model, arch, _ = load_model(cfg.model, source)
    tok = load_tokenizer(cfg.model, source)
    seq, keep_n = cfg.data.seq_length, cfg.prune.export_config.num_layers
    calib = calibration_rows(cfg.data.calib_path, tok, num_samples=2 * args.calib_rows, seq_length=seq)
    draws = {"A": calib[: args.calib_rows], "B": calib[args.calib_rows:]}
    evals = {"licenses": license_rows(tok, seq, args.eval_rows)}
    if args.valid_rows:  # 0: the held-out text of another kind only
        evals["valid split"] = heldout_rows(cfg.data.eval_path, tok, seq_length=seq, num_samples=args.valid_rows)
    runner, target = LayerRunner(model, arch.vocab_size), replace(arch, num_layers=keep_n)
    full = list(range(arch.num_layers))
    res = {"base": {e: row_losses(runner, r, full, args.micro_batch).tolist() for e, r in evals.items()}
           if "bi" in args.methods else {}, "runs": []}
    print("unpruned:", {e: round(sum(v) / len(v), 4) for e, v in res["base"].items()}, flush=True)
    for name, draw in ((n, d) for n, d in draws.items() if n in args.draws):
        for method, (scores, seconds) in method_scores(model, arch, draw, args, arch.num_layers - keep_n,
                                                       name in args.greedy_draws).items():
            plan = build_plan(arch, target, scores, layer_metric=method)
            dropped = sorted(set(full) - set(plan.keep_layers))
            losses = {e: row_losses(runner, r, plan.keep_layers, args.micro_batch).tolist() for e, r in evals.items()}
            res["runs"].append({"draw": name, "method": method, "dropped": dropped, "seconds": seconds,
                                "losses": losses})
            print(json.dumps({k: v for k, v in res["runs"][-1].items() if k != "losses"}),
                  {e: round(sum(v) / len(v), 4) for e, v in losses.items()}, flush=True)
    res["settings"] = {"calib_rows": args.calib_rows, "loss_rows": args.loss_rows, "greedy_rows": args.greedy_rows,
                       "eval_rows": args.eval_rows, "valid_rows": args.valid_rows,
                       "greedy_draws": args.greedy_draws, "seq_length": seq, "keep": keep_n, "host": platform.node(),
                       "threads": torch.get_num_threads()}
    return res


def _mean_se(values: list[float], ref: list[float]) -> str:
    d = torch.tensor(values, dtype=torch.float64) - torch.tensor(ref, dtype=torch.float64)
    se = d.std(unbiased=True).item() / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return f"{sum(values) / len(values):.3f} ({d.mean().item():+.3f} ± {se:.3f})"


def _cell(values: list[float], ref: Optional[list[float]]) -> str:
    return _mean_se(values, ref) if ref is not None else f"{sum(values) / len(values):.3f}"


def render(res: dict) -> str:
    s = res["settings"]
    evals = list(res["base"]) or (list(res["runs"][0]["losses"]) if res["runs"] else [])
    lines = [
        "# Depth pruning without retraining: SmolLM2-135M, 30 -> 15 layers (bench/depth_pruning.py)", "",
        f"Calibration: two disjoint draws (A, B) of {s['calib_rows']} x {s['seq_length']} rows of the default train "
        f"split; `loss` (when run) scored on the first {s['loss_rows']} rows of a draw, `greedy_loss` on the first "
        f"{s['greedy_rows']} (5 rounds of 3 layers), `bi` and `block_loss` on all of them. Evaluation: "
        f"{s['eval_rows']} x {s['seq_length']} rows of each held-out text; mean token loss, and in brackets the "
        "paired difference to `bi` of the same draw ± its standard error over rows. Lower is better. "
        "Scoring seconds: wall time of the method's scoring on its draw (the evaluation not included).", "",
        "| draw | metric | dropped layers | " + " | ".join(evals) + " | scoring seconds |",
        "|---|---|---|" + "---|" * len(evals) + "---|",
    ]
    if res["base"]:
        lines.append("| - | unpruned | - | " + " | ".join(f"{sum(v) / len(v):.3f}" for v in res["base"].values())
                     + " | - |")
    by = {(r["draw"], r["method"]): r for r in res["runs"]}
    for r in sorted(res["runs"], key=lambda r: (r["draw"], METHODS.index(r["method"]))):
        ref = by.get((r["draw"], "bi"))
        cells = [_cell(r["losses"][e], ref["losses"][e] if ref else None) for e in evals]
        lines.append(f"| {r['draw']} | {r['method']} | {r['dropped']} | " + " | ".join(cells)
                     + f" | {r['seconds']:.0f} |")
    pairs = [(d, e) for d in "AB" for e in evals if (d, "block_loss") in by and (d, "greedy_loss") in by]
    if pairs:
        lines += ["", "greedy_loss against block_loss (paired difference ± standard error over rows):", ""]
        lines += [f"- draw {d}, {e}: " + _mean_se(by[d, "greedy_loss"]["losses"][e], by[d, "block_loss"]["losses"][e])
                  for d, e in pairs]
    return "\n".join(lines + _stability(res, s))


def _stability(res: dict, s: dict) -> list[str]:
    lines = ["", "Stability (layers dropped by both draws, of 15):", ""]
    for m in METHODS:
        a, b = ({tuple(r["dropped"]) for r in res["runs"] if r["method"] == m and r["draw"] == d} for d in "AB")
        if a and b:
            lines.append(f"- {m}: {len(set(next(iter(a))) & set(next(iter(b))))}")
    missing = [m for m in METHODS if m not in {r["method"] for r in res["runs"]}]
    if missing:
        lines += ["", f"Not measured in this run: {', '.join(missing)}."]
    return lines + ["", f"Machine: {s['host']}, {s['threads']} threads, shared with other jobs (seconds are noisy).",
                    ""]


def merge(paths: list[str]) -> dict:
    """Results of several processes (one per draw) as one."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    return {"base": next((p["base"] for p in parts if p["base"]), {}), "settings": parts[0]["settings"],
            "runs": [r for p in parts for r in p["runs"]]}


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        res = merge(args.render)
    else:
        res = measure(args)
        raw = ROOT / "outputs" / f"bench_depth_{args.draws}_{args.methods.replace(',', '_')}.json"  # for --render
        atomic_write_text(raw, json.dumps(res, indent=1))
    atomic_write_text(Path(args.out), render(res))
    print(render(res))


if __name__ == "__main__":
    main()

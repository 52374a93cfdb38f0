"""docs/results.md (the table, the claims, the effects) and the loss-curve figure from results.json's dict."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from bench.minitron.stats import paired, std_err
from megaslim.figures import pyplot, save_png

TABLE_HEAD = ["| row | params (non-emb.) | held-out loss | PPL | SE | Δ vs ref ± paired SE | tokens | wall s | notes |",
              "|---|---|---|---|---|---|---|---|---|"]
CURVE_TRAININGS = ("kd", "kd_inter", "kd_contrastive", "iterative")  # the rows with distillation curves


def _f(x, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _loss_cells(rid: str, r: dict, ref: Optional[list[float]], reference: str) -> list[str]:
    """loss, PPL, SE and the paired difference to the reference row ("-" each when not measured)."""
    if not r.get("row_losses"):
        return ["-", "-", "-", "-"]
    loss, se = r["loss"], std_err(r["row_losses"])
    if rid == reference:
        delta = "ref"
    elif ref:
        p = paired(r["row_losses"], ref)
        delta = f"{p['diff']:+.4f} ± {p['se']:.4f}" + (" *" if p["significant"] else "")
    else:
        delta = "-"
    return [f"{loss:.4f}", f"{math.exp(loss):.1f}", f"{se:.4f}", delta]


def _notes(r: dict) -> str:
    status = r.get("status", "")
    notes = "" if status == "ok" else status
    if r.get("notes"):
        notes = "; ".join(x for x in (notes, r["notes"]) if x)
    return notes.replace("|", "/")


def row_table(results: dict[str, dict], order: list[str], reference: str) -> list[str]:
    ref = results.get(reference, {}).get("row_losses")
    lines = list(TABLE_HEAD)
    for rid in order:
        r = results[rid]
        params = (f"{r['params'] / 1e6:.2f}M ({r['params_non_embedding'] / 1e6:.2f}M)"
                  if r.get("params") else "-")
        cells = _loss_cells(rid, r, ref, reference)
        wall = sum(v for v in (r.get("prune_seconds"), r.get("train_seconds")) if v)
        lines.append(f"| {r.get('label', rid)} (`{rid}`) | {params} | " + " | ".join(cells)
                     + f" | {r.get('tokens', 0):,} | {_f(wall or None, '.0f')} | {_notes(r)} |")
    return lines


def _preamble(m: dict, reference: str) -> list[str]:
    """Title, command, machine, settings, shapes and how to read the SE columns."""
    return ["# Minitron comparisons on SmolLM2-135M (`bench/minitron_table.py`)", "",
            f"Command: `{m['command']}`  ",
            f"Machine: {m['machine']}; {m['date']}; total wall time {m['wall_seconds'] / 60:.1f} min.  ",
            f"Settings: T = {m['tokens']:,} training tokens ({m['steps_T']} steps of {m['tokens_per_step']:,} "
            f"tokens: micro-batch {m['micro_batch_size']} x global batch {m['global_batch_size']} x seq "
            f"{m['seq_length']}), LR {m['lr']:g} -> {m['min_lr']:g} cosine, config `{m['config']}`. Held-out: "
            f"{m['eval_rows']} rows x {m['seq_length']} tokens of {m['eval_path']} (launch/evaluate.py's "
            "protocol).", "",
            f"Shapes: width = hidden 576->468, ffn 1536->750 (heads kept); depth = 30->{m['depth_layers']} layers "
            f"(lowest Block Importance dropped); heads = 9->6 heads (3 groups x 2), ffn 1536->642; iterative = "
            "width in two rounds through hidden 522 / ffn 1143. Width, depth and heads students have the same "
            "**non-embedding** parameter count (53.1-53.2M); their totals differ because the tied 49152-row "
            "embedding scales with the hidden size (both counts are in the table).", "",
            "SE = standard error of the loss over eval rows (per-row mean losses). Δ vs ref = loss minus the "
            f"reference row `{reference}` on the same rows, ± the SE of the per-row differences; `*` "
            "marks |Δ| > 2 paired SE. Rows are paired (every model sees the same rows, so row difficulty "
            "cancels): the paired SE is the right test, and it is usually much smaller than either row's SE. "
            "Eval rows are consecutive windows of the same documents, so they are not fully independent: "
            "read 2 SE as a rough bar, not an exact test.", ""]


def render_markdown(doc: dict) -> str:
    """docs/results.md from the results dict (meta, rows, claims, effects)."""
    results = doc["rows"]
    order = [rid for rid in doc["order"] if rid in results]
    out = _preamble(doc["meta"], doc["reference"]) + row_table(results, order, doc["reference"])
    out += ["", "## The paper's claims at this scale", "",
            "Generated from the numbers above: a difference counts only beyond 2 paired SE.", ""]
    out += [f"- **{c['topic']}** (paper: {c['paper']}). {c['text']}" for c in doc["claims"]]
    effects = [e for e in doc.get("effects", []) if e.get("text")]
    if effects:
        out += ["", "## Other measured effects", ""]
        out += [f"- {e['label']}: {e['text']}" for e in effects]
    out += ["", "## Loss curves", "",
            "![loss curves](results_loss_curves.png)", "",
            "Training loss (left) and held-out loss (right) of the distillation runs against training tokens "
            "(from each run's metrics.jsonl).", ""]
    if doc.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(out)


def _curve(metrics: list[str]) -> list[dict]:
    """The records of a run's metrics.jsonl files, tokens made cumulative across them (compress rounds)."""
    recs, offset = [], 0
    for mpath in metrics:
        p = Path(mpath)
        if not p.is_file():
            continue
        part = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        recs += [{**rec, "tokens": rec.get("tokens", 0) + offset} for rec in part]
        offset = max([rec.get("tokens", 0) for rec in part] + [0]) + offset
    return recs


def plot_curves(results: dict[str, dict], path: Path) -> Optional[Path]:
    """Training KD loss and held-out loss of the distillation rows against tokens (None: no curve)."""
    curves = [(rid, _curve(r.get("metrics", []))) for rid, r in results.items()
              if r.get("status") == "ok" and r["train"] in CURVE_TRAININGS]
    curves = [(rid, recs) for rid, recs in curves if recs]
    if not curves:
        return None
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4))
    for rid, recs in curves:
        tr = [(x["tokens"], x.get("kd_loss", x.get("loss"))) for x in recs if "loss" in x]
        ev = [(x["tokens"], x["eval_loss"]) for x in recs if "eval_loss" in x]
        if tr:
            ax1.plot(*zip(*tr), label=rid)
        if ev:
            ax2.plot(*zip(*ev), "o-", label=rid)
    ax1.set(xlabel="training tokens", ylabel="logit KD loss (KL)", title="distillation: training KD loss")
    ax2.set(xlabel="training tokens", ylabel="held-out loss", title="distillation: held-out loss")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save_png(fig, path)

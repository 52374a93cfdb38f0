"""Weight sparsity of the decoder's linears (sparsity/linears.py): masks at any TP/PP/DP, applied to the
model, measured, and the prune command's sparsity step (checked before compute, applied after pruning).

Parallelism: scores are computed on this rank's weight shard (wanda: with this rank's input norms, see
wanda.py). When a comparison group spans TP shards (a row of a row-parallel layer, or a whole layer for
magnitude), the score shards are all-gathered and assembled into the full logical matrix by
`megaslim.model.layout` (the one owner of how each weight is split), the mask is computed there and this
rank's shard of it kept, so masks equal the TP=1 masks. PP stages handle their own layers; DP replicas
compute the same masks from the same weights and DP-reduced norms.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table

from megaslim import io as mio
from megaslim.data.calibration import calibration_rows
from megaslim.errors import MegaslimError
from megaslim.model.layout import Layout, shard, unshard
from megaslim.runtime.layout import ParallelLayout
from megaslim.sparsity.linears import NAMES, Linear, check_pattern, local_linears
from megaslim.sparsity.masks import comparison_group, make_mask, scores_for
from megaslim.sparsity.store import MASKS_KEY, sharded_masks
from megaslim.sparsity.wanda import input_norms

# -- masks at any TP -----------------------------------------------------------------------------


def _local_mask(lin: Linear, scores: torch.Tensor, *, method: str, ratio: float, pattern: str) -> torch.Tensor:
    """This rank's keep-mask for `lin`, computed on the full logical matrix when the group spans shards."""
    per_layer = pattern == "unstructured" and comparison_group(method) == "layer"
    if lin.layout is not Layout.ROW and not per_layer:  # output rows are whole on this rank
        return make_mask(scores, method=method, ratio=ratio, pattern=pattern)
    parts = ParallelLayout.tp_gather_parts(scores, cpu=False)
    if len(parts) == 1:  # TP=1: this rank holds the full matrix
        return make_mask(scores, method=method, ratio=ratio, pattern=pattern)
    full = make_mask(unshard(parts, lin.layout), method=method, ratio=ratio, pattern=pattern)
    return shard(full, lin.layout, ParallelLayout.tp_rank(), len(parts)).contiguous()


def compute_masks(model, *, method: str, ratio: float, pattern: str,
                  norms: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """{weight name: bool keep-mask shaped like this rank's weight shard} for every local decoder linear.
    `norms` (wanda): input_norms(...) of the same model."""
    masks = {}
    for lin in local_linears(model):
        s = scores_for(lin.weight, method, norms.get(lin.param_name) if norms is not None else None)
        masks[lin.param_name] = _local_mask(lin, s, method=method, ratio=ratio,
                                            pattern=pattern).to(lin.weight.device)
    return masks


@torch.no_grad()
def apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].data.masked_fill_(~mask.to(params[name].device), 0)


def zero_fractions(model) -> list[dict]:
    """[{layer, linear_qkv: fraction of zeros, ...}] for every layer (all stages), the same on every rank
    (collective). Counts exact zeros of the weights, so it measures what the model holds."""
    num_layers = model.config.num_layers
    counts = torch.zeros(num_layers, len(NAMES), 2, dtype=torch.float64)
    if ParallelLayout.dp_rank() == 0:  # DP replicas hold the same weights: count them once
        for lin in local_linears(model):
            w = lin.weight.detach()
            counts[lin.layer, NAMES.index(lin.name)] = torch.tensor([(w == 0).sum().item(), w.numel()])
    counts = ParallelLayout.all_reduce(counts)
    return [{"layer": i, **{n: counts[i, j, 0].item() / counts[i, j, 1].item() for j, n in enumerate(NAMES)},
             "zeros": int(counts[i, :, 0].sum()), "weights": int(counts[i, :, 1].sum())}
            for i in range(num_layers)]


# -- the prune command's sparsity step -----------------------------------------------------------


@dataclass
class Sparsity:
    """prune.sparsity for one prune run; every method is a no-op when `method` is None."""
    method: Optional[str] = None
    ratio: float = 0.5
    pattern: str = "unstructured"
    rows: Optional[torch.Tensor] = None  # wanda's calibration rows
    masks: Optional[dict] = None
    layers: Optional[list] = None

    @property
    def record(self) -> Optional[dict]:
        if self.method is None:
            return None
        return {"method": self.method, "ratio": 0.5 if self.pattern == "2:4" else self.ratio,
                "pattern": self.pattern,
                "group": "n:m" if self.pattern == "2:4" else comparison_group(self.method),
                "linears": list(NAMES),
                **({"calibration_samples": int(self.rows.shape[0]),
                    "seq_length": int(self.rows.shape[1] - 1)} if self.rows is not None else {})}

    def apply(self, model, arch, out_dir, *, micro_batch_size: int) -> None:
        """Compute masks (wanda: one calibration pass), zero the weights, print and write sparsity.json."""
        if self.method is None:
            return
        check_pattern(arch, self.pattern)
        norms = None
        if self.method == "wanda":
            norms = input_norms(model, self.rows, micro_batch_size=micro_batch_size)
        self.masks = compute_masks(model, method=self.method, ratio=self.ratio, pattern=self.pattern, norms=norms)
        apply_masks(model, self.masks)
        self.layers = zero_fractions(model)
        if ParallelLayout.is_writer():
            mio.write_json(Path(out_dir) / "sparsity.json", self.summary())
        print_table(self.layers, self.record)

    def summary(self) -> Optional[dict]:
        if self.method is None:
            return None
        zeros, total = sum(r["zeros"] for r in self.layers), sum(r["weights"] for r in self.layers)
        return {**self.record, "zeros": zeros, "weights": total, "fraction": zeros / total,
                "layers": self.layers}

    def extra(self) -> dict:
        return {"sparsity": self.record} if self.method is not None else {}

    def sharded(self, model) -> Optional[dict]:
        return {MASKS_KEY: sharded_masks(model, self.masks)} if self.method is not None else None


def print_table(layers: list[dict], record: dict) -> None:
    if not ParallelLayout.is_writer():
        return
    t = Table(title=f"sparsity: {record['method']} {record['pattern']} ratio {record['ratio']} (fraction of zeros)")
    for col in ("layer", *NAMES):
        t.add_column(col)
    for r in layers:
        t.add_row(str(r["layer"]), *(f"{r[n]:.4f}" for n in NAMES))
    zeros, total = sum(r["zeros"] for r in layers), sum(r["weights"] for r in layers)
    t.add_row("all", f"{zeros:,} / {total:,} = {zeros / total:.4f}", "", "", "")
    Console().print(t)


def _wanda_rows(cfg, tokenizer, layout: ParallelLayout) -> torch.Tensor:
    """Wanda's calibration rows, read now; each data-parallel rank of the pruned layout needs one (its
    refusal of the TE spec is the config's: validate_prune)."""
    try:
        rows = calibration_rows(cfg.data.calib_path, tokenizer, num_samples=cfg.importance.num_samples,
                                seq_length=cfg.data.seq_length)
    except MegaslimError as err:
        raise MegaslimError(f"prune.sparsity.method=wanda needs calibration rows "
                            f"(data.calib_path, importance.num_samples): {err}") from err
    dp = max(layout.target_dp, 1)
    if rows.shape[0] < dp:
        raise MegaslimError(f"prune.sparsity.method=wanda: {rows.shape[0]} calibration rows for {dp} "
                            "data-parallel ranks; raise importance.num_samples")
    return rows


def prepare_sparsity(cfg, arch, *, tokenizer, layout: Optional[ParallelLayout] = None) -> Sparsity:
    """prune.sparsity checked before any compute against the pruned shape `arch` (None: not known yet,
    checked when applied); wanda's calibration rows read now. `layout`: the run's (default: from `cfg`)."""
    sp = cfg.prune.sparsity
    if sp.method is None:
        return Sparsity()
    if arch is not None:
        check_pattern(arch, sp.pattern)
    rows = None
    if sp.method == "wanda":
        rows = _wanda_rows(cfg, tokenizer, layout or ParallelLayout.from_config(cfg))
    return Sparsity(sp.method, sp.ratio, sp.pattern, rows)

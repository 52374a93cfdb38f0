"""Weight sparsity of the decoder's linears (linear_qkv, linear_proj, linear_fc1, linear_fc2 of every
layer; embeddings and the output layer stay dense, as in Wanda): masks at any TP/PP/DP, applied to the
model, measured, and stored in checkpoints as ShardedTensors sharded like their weights.

Parallelism: scores are computed on this rank's weight shard (wanda: with this rank's input norms, see
wanda.py). When a comparison group spans TP shards (a row of a row-parallel layer, or a whole layer for
magnitude), the score shards are all-gathered into the full logical matrix, the mask is computed there
and this rank's slice is kept, so masks equal the TP=1 masks. PP stages handle their own layers; DP
replicas compute the same masks from the same weights and DP-reduced norms.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megaslim.errors import MegaslimError
from megaslim.sparsity.masks import comparison_group, make_mask, scores_for

MASKS_KEY = "sparsity_masks"  # the sharded_extra entry of a checkpoint
_PREFIX = "sparsity_mask."  # prepended to each weight's checkpoint key
# (parent module, linear, how megatron shards its weight under TP: column = output rows, row = input columns)
LINEARS = (("self_attention", "linear_qkv", "column"), ("self_attention", "linear_proj", "row"),
           ("mlp", "linear_fc1", "column"), ("mlp", "linear_fc2", "row"))
NAMES = tuple(n for _, n, _ in LINEARS)


@dataclass
class Linear:
    layer: int  # global layer index
    name: str  # linear_qkv | linear_proj | linear_fc1 | linear_fc2
    module: torch.nn.Module
    param_name: str  # its weight's name in model.named_parameters() / sharded_state_dict()
    parallel: str  # column | row

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


def local_linears(model) -> list[Linear]:
    """This rank's (pipeline stage's) decoder linears, in layer order."""
    params = dict(model.named_parameters())
    out = []
    for i, layer in enumerate(model.decoder.layers):
        for parent, name, par in LINEARS:
            mod = getattr(getattr(layer, parent), name)
            pname = f"decoder.layers.{i}.{parent}.{name}.weight"
            if params.get(pname) is not mod.weight:
                raise MegaslimError(f"sparsity: {pname} is not the weight of {parent}.{name} (unexpected model layout)")
            out.append(Linear(layer.layer_number - 1, name, mod, pname, par))
    return out


def input_dims(arch) -> dict[str, int]:
    """The full input dimension of each linear (what 2:4 groups run along)."""
    return {"linear_qkv": arch.hidden_size, "linear_proj": arch.num_attention_heads * arch.kv_channels,
            "linear_fc1": arch.hidden_size, "linear_fc2": arch.ffn_hidden_size}


def check_pattern(arch, pattern: str) -> None:
    if pattern != "2:4":
        return
    bad = {k: v for k, v in input_dims(arch).items() if v % 4}
    if bad:
        raise MegaslimError(f"prune.sparsity.pattern=2:4 groups 4 consecutive inputs; these input dimensions "
                            f"are not divisible by 4: {bad} (choose a pruned shape whose dimensions divide by 4, "
                            "or pattern=unstructured)")


# -- masks at any TP -----------------------------------------------------------------------------


def _tp_gather(t: torch.Tensor, dim: int) -> list[torch.Tensor]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return parts


def _full_mask(lin: Linear, scores: torch.Tensor, *, method: str, ratio: float, pattern: str,
               gated: bool) -> torch.Tensor:
    """This rank's keep-mask for `lin`, computed on the full logical matrix when the group spans shards."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    per_layer = pattern == "unstructured" and comparison_group(method) == "layer"
    if tp == 1 or (lin.parallel == "column" and not per_layer):  # rows are whole on this rank
        return make_mask(scores, method=method, ratio=ratio, pattern=pattern)
    if lin.parallel == "row":  # input columns are sharded: gather full rows (global column order)
        full = torch.cat(_tp_gather(scores, 1), dim=1)
        mask = make_mask(full, method=method, ratio=ratio, pattern=pattern)
        w = scores.shape[1]
        return mask[:, rank * w:(rank + 1) * w].contiguous()
    # column-parallel, whole-layer group: assemble the logical row order (a gated fc1 shard is [gate_r; up_r])
    parts = _tp_gather(scores, 0)
    n = scores.shape[0]
    if lin.name == "linear_fc1" and gated:
        h = n // 2
        full = torch.cat([p[:h] for p in parts] + [p[h:] for p in parts])
        mask = make_mask(full, method=method, ratio=ratio, pattern=pattern)
        f = h * tp
        return torch.cat([mask[rank * h:(rank + 1) * h], mask[f + rank * h:f + (rank + 1) * h]]).contiguous()
    mask = make_mask(torch.cat(parts), method=method, ratio=ratio, pattern=pattern)
    return mask[rank * n:(rank + 1) * n].contiguous()


def compute_masks(model, *, method: str, ratio: float, pattern: str,
                  norms: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """{weight name: bool keep-mask shaped like this rank's weight shard} for every local decoder linear.
    `norms` (wanda): input_norms(...) of the same model."""
    masks = {}
    gated = bool(model.config.gated_linear_unit)
    for lin in local_linears(model):
        s = scores_for(lin.weight, method, norms.get(lin.param_name) if norms is not None else None)
        masks[lin.param_name] = _full_mask(lin, s, method=method, ratio=ratio, pattern=pattern,
                                           gated=gated).to(lin.weight.device)
    return masks


@torch.no_grad()
def apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].data.masked_fill_(~mask.to(params[name].device), 0)


def zero_fractions(model) -> list[dict]:
    """[{layer, linear_qkv: fraction of zeros, ...}] for every layer (all stages), the same on every rank
    (collective). Counts exact zeros of the weights, so it measures what the model holds."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    num_layers = model.config.num_layers
    counts = torch.zeros(num_layers, len(NAMES), 2, dtype=torch.float64)
    if ps.get_data_parallel_rank() == 0:
        for lin in local_linears(model):
            w = lin.weight.detach()
            counts[lin.layer, NAMES.index(lin.name)] = torch.tensor([(w == 0).sum().item(), w.numel()])
    dev = next(model.parameters()).device
    counts = counts.to(dev)
    dist.all_reduce(counts)
    counts = counts.cpu()
    return [{"layer": i, **{n: counts[i, j, 0].item() / counts[i, j, 1].item() for j, n in enumerate(NAMES)},
             "zeros": int(counts[i, :, 0].sum()), "weights": int(counts[i, :, 1].sum())}
            for i in range(num_layers)]


# -- checkpoints ---------------------------------------------------------------------------------


def sharded_masks(model, masks: dict[str, torch.Tensor], *, for_loading: bool = False) -> dict:
    """The masks as sharded tensors laid out like their weights (uint8; key 'sparsity_mask.<weight key>'),
    for `save_checkpoint(..., sharded_extra={MASKS_KEY: ...})` or as a load request (`for_loading`)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    ssd = model.sharded_state_dict()
    out = {}
    for name, mask in masks.items():
        sh = ssd[name]
        data = torch.zeros(mask.shape, dtype=torch.uint8, device=mask.device) if for_loading else mask.to(torch.uint8)
        if isinstance(sh, ShardedTensor):
            out[name] = dataclasses.replace(sh, key=_PREFIX + sh.key, data=data, dtype=torch.uint8)
        elif isinstance(sh, ShardedTensorFactory):
            out[name] = dataclasses.replace(sh, key=_PREFIX + sh.key, data=data)
        else:
            raise MegaslimError(f"sparsity: cannot store a mask for {name} ({type(sh).__name__})")
    return out


def local_mask_templates(model) -> dict[str, torch.Tensor]:
    return {lin.param_name: torch.ones_like(lin.weight, dtype=torch.bool) for lin in local_linears(model)}


def checkpoint_sparsity(path) -> Optional[dict]:
    """The `sparsity` record of a checkpoint's megaslim.json extra (None: dense), without loading."""
    from megaslim import checkpoint as ckpt

    return ckpt.read_meta(path).get("extra", {}).get("sparsity")


def load_masks(model, path) -> dict[str, torch.Tensor]:
    """This rank's masks from a sparse checkpoint (any TP/PP it was saved at). Collective."""
    from megatron.core import dist_checkpointing

    from megaslim import checkpoint as ckpt

    meta = ckpt.verify(path)
    if MASKS_KEY not in meta.get("sharded_extra", []):
        raise MegaslimError(f"checkpoint {meta['path']} holds no sparsity masks")
    request = sharded_masks(model, local_mask_templates(model), for_loading=True)
    try:
        with ckpt._quiet_megatron_internals():
            loaded = dist_checkpointing.load({MASKS_KEY: request}, meta["path"])
    except BaseException as err:  # DCP raises a BaseException subclass
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise MegaslimError(f"checkpoint {meta['path']}: its sparsity masks do not load into this model "
                            f"({type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''})"
                            ) from err
    return {k: v.bool() for k, v in loaded[MASKS_KEY].items()}


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
            from megaslim.sparsity.wanda import input_norms

            norms = input_norms(model, self.rows, micro_batch_size=micro_batch_size)
        self.masks = compute_masks(model, method=self.method, ratio=self.ratio, pattern=self.pattern, norms=norms)
        apply_masks(model, self.masks)
        self.layers = zero_fractions(model)
        from megaslim import io as mio
        from megaslim import report

        if report.is_rank0():
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
    from megaslim import report

    if not report.is_rank0():
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sparsity: {record['method']} {record['pattern']} ratio {record['ratio']} (fraction of zeros)")
    for col in ("layer", *NAMES):
        t.add_column(col)
    for r in layers:
        t.add_row(str(r["layer"]), *(f"{r[n]:.4f}" for n in NAMES))
    zeros, total = sum(r["zeros"] for r in layers), sum(r["weights"] for r in layers)
    t.add_row("all", f"{zeros:,} / {total:,} = {zeros / total:.4f}", "", "", "")
    Console().print(t)


def prepare_sparsity(cfg, arch, *, tokenizer) -> Sparsity:
    """prune.sparsity checked before any compute against the pruned shape `arch` (None: not known yet,
    checked when applied); wanda's calibration rows read now."""
    sp = cfg.prune.sparsity
    if sp.method is None:
        return Sparsity()
    if cfg.importance.only:
        raise MegaslimError("prune.sparsity.method is applied after pruning; importance.only=true stops before it")
    if arch is not None:
        check_pattern(arch, sp.pattern)
    rows = None
    if sp.method == "wanda":
        if cfg.model.transformer_impl == "transformer_engine":
            raise MegaslimError("wanda needs each linear's input, which Transformer Engine's fused norm+linear "
                                "hides (it sees the un-normalized hidden states); use "
                                "model.transformer_impl=modelopt or local")
        from megaslim.data.calibration import calibration_rows

        try:
            rows = calibration_rows(cfg.data.calib_path, tokenizer, num_samples=cfg.importance.num_samples,
                                    seq_length=cfg.data.seq_length)
        except MegaslimError as err:
            raise MegaslimError(f"prune.sparsity.method=wanda needs calibration rows "
                                f"(data.calib_path, importance.num_samples): {err}") from err
        import os

        world = int(os.environ.get("WORLD_SIZE", "1"))
        tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
        ttp = cfg.prune.target_tensor_model_parallel_size or tp
        tpp = cfg.prune.target_pipeline_model_parallel_size or pp
        dp = max(world // (ttp * tpp), 1)
        if rows.shape[0] < dp:
            raise MegaslimError(f"prune.sparsity.method=wanda: {rows.shape[0]} calibration rows for {dp} "
                                "data-parallel ranks; raise importance.num_samples")
    return Sparsity(sp.method, sp.ratio, sp.pattern, rows)

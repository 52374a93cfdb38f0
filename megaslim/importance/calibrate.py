"""The calibration pass: hooks on, packed samples through the (pipelined) model, scores out."""
from __future__ import annotations

import time
from typing import Optional

import torch
from tqdm import tqdm

from megaslim.config import ImportanceConfig
from megaslim.errors import MegaslimError
from megaslim.eval import evaluate_rows
from megaslim.importance.depth import depth_scores
from megaslim.importance.hooks import CalibContext, attach_hooks
from megaslim.importance.reduce import reduce_scores
from megaslim.importance.scores import ImportanceScores
from megaslim.model.arch import ModelArch
from megaslim.model.expert_parallel import pad_for_expert_parallel
from megaslim.model.forward import make_microbatches, run_forward
from megaslim.runtime.layout import ParallelLayout


def check_importance_spec(transformer_impl: str) -> None:
    if transformer_impl == "transformer_engine":
        raise MegaslimError(
            "importance needs the norm outputs, which Transformer Engine's fused norm+linear hides; "
            "use model.transformer_impl=modelopt (TE norms + separate linears, same checkpoint keys) "
            "or model.transformer_impl=local"
        )


def _progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="batch", disable=not ParallelLayout.is_writer(), dynamic_ncols=True)


def activation_scores(model, arch: ModelArch, rows: torch.Tensor, cfg: ImportanceConfig, *,
                      micro_batch_size: int) -> dict[str, torch.Tensor]:
    """Heads, query groups, neurons, channels and Block Importance from one pass over `rows`
    (the full calibration set; each DP rank takes rows r::dp)."""
    layout = ParallelLayout.from_groups()
    batches = make_microbatches(layout.shard_rows(rows), micro_batch_size)
    batches = pad_for_expert_parallel(batches, rows, layout.dp, micro_batch_size)  # EP: same count
    ctx = CalibContext()
    bar = _progress(len(batches), "importance")

    def on_batch(batch):
        ctx.valid = batch["loss_mask"][:, 0] > 0
        bar.update(1)

    with attach_hooks(model, ctx, seq_agg=cfg.seq_agg, neuron_signal=cfg.neuron_signal) as hooks:
        run_forward(model, batches, lambda b, o: {}, seq_length=rows.shape[1] - 1,
                    micro_batch_size=micro_batch_size, on_batch=on_batch)
        bar.close()
        return reduce_scores(hooks, arch, batch_agg=cfg.batch_agg)


def layer_loss_scores(model, arch: ModelArch, rows: torch.Tensor, *, micro_batch_size: int) -> torch.Tensor:
    """LM loss with layer l skipped minus the baseline loss, for every layer (one pass per layer)."""
    def run():
        return evaluate_rows(model, rows, vocab_size=arch.vocab_size, micro_batch_size=micro_batch_size)["loss"]

    base = run()
    out = torch.zeros(arch.num_layers, dtype=torch.float64)
    local = {layer.layer_number - 1: layer for layer in model.decoder.layers}
    bar = _progress(arch.num_layers, "layer loss")
    for i in range(arch.num_layers):
        handle = None
        if i in local:  # only the stage that owns layer i skips it; the others run as usual
            handle = local[i].register_forward_hook(
                lambda m, args, kwargs, output: (kwargs.get("hidden_states", args[0] if args else None), output[1]),
                with_kwargs=True)
        try:
            out[i] = run() - base
        finally:
            if handle is not None:
                handle.remove()
        bar.update(1)
    bar.close()
    return out


def compute_importance(model, arch: ModelArch, rows: torch.Tensor, cfg: ImportanceConfig, *,
                       micro_batch_size: int, transformer_impl: str,
                       loss_rows: Optional[torch.Tensor] = None, depth_metric: Optional[str] = None,
                       layer_drop: Optional[int] = None, layer_blocks: int = 1) -> tuple[ImportanceScores, dict]:
    """Activation scores on `rows`, plus the layer-loss scores on `loss_rows` (default: the first
    `cfg.layer_loss_samples` rows) that `cfg.layer_metrics` lists. The joint depth scores (block_loss,
    greedy_loss; `depth_metric` is prune.layer_metric) score removing `layer_drop` layers."""
    check_importance_spec(transformer_impl)
    t0 = time.time()
    scores = activation_scores(model, arch, rows, cfg, micro_batch_size=micro_batch_size)
    t_act = time.time() - t0
    lr = loss_rows if loss_rows is not None else rows[: cfg.layer_loss_samples]
    layer_loss = None
    if "loss" in cfg.layer_metrics:
        layer_loss = layer_loss_scores(model, arch, lr, micro_batch_size=micro_batch_size)
    metrics = [str(m) for m in cfg.layer_metrics] + ([str(depth_metric)] if depth_metric else [])
    joint, joint_settings = depth_scores(model, arch, lr, metrics=metrics, drop=layer_drop, blocks=layer_blocks,
                                         micro_batch_size=micro_batch_size)
    seconds = time.time() - t0
    tokens = rows.shape[0] * (rows.shape[1] - 1)
    settings = {
        "seq_agg": cfg.seq_agg, "batch_agg": cfg.batch_agg, "neuron_signal": cfg.neuron_signal,
        "layer_metrics": list(cfg.layer_metrics), "num_samples": int(rows.shape[0]),
        "seq_length": int(rows.shape[1] - 1), "layer_loss_samples": cfg.layer_loss_samples,
        "arch": arch.to_dict(), **joint_settings,
    }
    result = ImportanceScores(**scores, layer_loss=layer_loss, **joint, settings=settings)
    cost = {"seconds": seconds, "activation_seconds": t_act, "tokens": tokens,
            "tokens_per_second": tokens / max(t_act, 1e-9)}
    return result, cost

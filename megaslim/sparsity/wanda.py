"""Wanda's activation statistic: ||X_j||_2 over every calibration token, per input feature j of each
decoder linear, from forward pre-hooks attached outside megatron-core (removed in `finally`).

Each rank sees its own inputs: column-parallel layers (linear_qkv, linear_fc1) get the full replicated
input, row-parallel layers (linear_proj, linear_fc2) the slice of input features that matches their
weight shard's columns, so the local norms pair with the local weight as they are. Sums of squares are
accumulated in float64 over the real (unpadded) samples, summed over data-parallel ranks, and only then
square-rooted.
"""
from __future__ import annotations

import torch

from megaslim.errors import MegaslimError
from megaslim.importance.hooks import CalibContext
from megaslim.model.forward import make_microbatches, run_forward
from megaslim.runtime.layout import ParallelLayout
from megaslim.sparsity.linears import local_linears


class InputNormHook:
    """Sum over real tokens of x_j^2 for each input feature j of one linear."""

    def __init__(self, module: torch.nn.Module, ctx: CalibContext):
        self.ctx = ctx
        self.sumsq = None
        self.handle = module.register_forward_pre_hook(self._pre)

    def _pre(self, module, args):
        x = args[0].detach()  # [s, b, in_local]
        if self.ctx.valid is not None:
            x = x[:, self.ctx.valid.to(x.device)]
        part = x.double().pow(2).sum(dim=(0, 1)).cpu()
        self.sumsq = part if self.sumsq is None else self.sumsq + part

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def input_norms(model, rows: torch.Tensor, *, micro_batch_size: int) -> dict[str, torch.Tensor]:
    """{weight parameter name: ||X_j||_2 [in_local] float64} for this rank's decoder linears, from the
    full calibration `rows` (each DP rank takes rows r::dp; the squared sums are all-reduced over DP)."""
    layout = ParallelLayout.from_groups()
    mine = layout.shard_rows(rows)
    if mine.shape[0] == 0:
        raise MegaslimError(f"wanda needs calibration rows on every data-parallel rank: {rows.shape[0]} "
                            f"rows for DP={layout.dp}; raise importance.num_samples")
    sumsq = _input_sumsq(model, mine, seq_length=rows.shape[1] - 1, micro_batch_size=micro_batch_size)
    names = sorted(sumsq)
    flat = torch.cat([sumsq[n] for n in names])
    if layout.dp > 1:
        from megatron.core import parallel_state as ps

        flat = ParallelLayout.all_reduce(flat, group=ps.get_data_parallel_group())
    out, i = {}, 0
    for n in names:
        k = sumsq[n].numel()
        out[n] = flat[i:i + k].sqrt()
        i += k
    return out


def _input_sumsq(model, rows: torch.Tensor, *, seq_length: int, micro_batch_size: int) -> dict[str, torch.Tensor]:
    """{weight name: sum over this rank's real tokens of x_j^2}: one forward pass with the hooks on."""
    ctx = CalibContext()
    hooks: dict[str, InputNormHook] = {}

    def on_batch(batch):
        ctx.valid = batch["loss_mask"][:, 0] > 0

    try:
        for lin in local_linears(model):
            hooks[lin.param_name] = InputNormHook(lin.module, ctx)
        run_forward(model, make_microbatches(rows, micro_batch_size), lambda b, o: {}, seq_length=seq_length,
                    micro_batch_size=micro_batch_size, on_batch=on_batch)
    finally:
        for h in hooks.values():
            h.remove()
    return {n: h.sumsq for n, h in hooks.items()}

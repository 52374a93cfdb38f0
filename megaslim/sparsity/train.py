"""Mask-preserving training: a sparse student's pruned weights stay exactly zero through distillation.

Two things, both cheap (one masked_fill per linear):
1. gradients are masked after the data-parallel reduction and before the optimizer (wrapped around
   megatron's finalize_model_grads). Pruned weights start at exactly 0 and receive gradient 0, so Adam's
   moments stay 0, its update is 0 / (sqrt(0) + eps) = 0 and decoupled weight decay multiplies 0: the
   optimizer itself never moves them, fp32 main params of the distributed optimizer included. Masking
   here also keeps the pruned weights' gradients out of the global grad norm, so clipping (and the logged
   grad_norm) is that of the sparse model, and the optimizer state describes the sparse model.
2. the masks are re-applied to the model params after every optimizer.step() (megatron has copied main
   params into the model params and all-gathered them by then): exact whatever the optimizer does.
The tests check exact zeros after distillation (DP=2, distributed optimizer) and after a resume.
"""
from __future__ import annotations

from typing import Optional

import torch

from megaslim.errors import MegaslimError
from megaslim.sparsity.apply import apply_masks
from megaslim.sparsity.store import MASKS_KEY, checkpoint_sparsity, load_masks, sharded_masks


class MaskKeeper:
    def __init__(self, model, masks: dict[str, torch.Tensor], record: dict):
        self.model, self.record = model, record
        self.set_masks(masks)

    @classmethod
    def from_checkpoint(cls, model, path) -> Optional["MaskKeeper"]:
        """The keeper of a sparse checkpoint's masks (applied to `model` now), None for a dense one."""
        if path is None:
            return None
        record = checkpoint_sparsity(path)
        if record is None:
            return None
        return cls(model, load_masks(model, path), record)

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        missing = sorted(n for n in masks if n not in params)
        if missing:
            raise MegaslimError(f"sparsity masks name weights this student lacks: {missing[:5]}")
        apply_masks(self.model, masks)
        # only the drop masks are held (one bool per weight); keep-masks are made when saving
        self._drops = {n: ~m.to(params[n].device) for n, m in masks.items()}
        self._pairs = [(params[n], d) for n, d in self._drops.items()]

    def keep_masks(self) -> dict[str, torch.Tensor]:
        return {n: ~d for n, d in self._drops.items()}

    @torch.no_grad()
    def mask_grads(self) -> None:
        for p, drop in self._pairs:
            for g in (getattr(p, "main_grad", None), p.grad):
                if g is not None:
                    g.masked_fill_(drop, 0)

    @torch.no_grad()
    def mask_params(self) -> None:
        for p, drop in self._pairs:
            p.data.masked_fill_(drop, 0)

    def wrap_finalize(self, config) -> None:
        """Mask gradients right after megatron's finalize_model_grads (grads reduced, optimizer next)."""
        inner = config.finalize_model_grads_func

        def finalize(*args, **kwargs):
            out = inner(*args, **kwargs)
            self.mask_grads()
            return out

        config.finalize_model_grads_func = finalize

    def sharded(self) -> dict:
        return {MASKS_KEY: sharded_masks(self.model, self.keep_masks())}

    def load_request(self) -> dict:
        return {MASKS_KEY: sharded_masks(self.model, self.keep_masks(), for_loading=True)}


def check_resume(meta: dict, keeper: Optional[MaskKeeper], root) -> bool:
    """Whether the run being resumed is sparse (its masks must then be loaded); refuses a sparse run
    without its masks and a sparse/dense mismatch between the checkpoint and the student."""
    record = meta.get("extra", {}).get("sparsity")
    if record is not None and MASKS_KEY not in meta.get("sharded_extra", []):
        raise MegaslimError(f"resume: {root} is a sparse run ({record.get('method')} {record.get('pattern')}) but "
                            "its checkpoint holds no sparsity masks, so the pruned weights could not be kept at "
                            "zero; restart the distillation from the sparse student")
    if keeper is not None and record is None:
        raise MegaslimError(f"resume: the student is sparse but {root} was written by a dense run (no "
                            "sparsity masks); use another output_dir")
    if keeper is None and record is not None:
        raise MegaslimError(f"resume: {root} is a sparse run but distill.student.load is not a sparse "
                            "checkpoint; resume with the same student")
    return record is not None

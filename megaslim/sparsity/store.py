"""Sparsity masks in checkpoints: ShardedTensors laid out like their weights (so they load at any
TP/PP), saved beside the model under `MASKS_KEY`, and the `sparsity` record of megaslim.json."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megaslim import checkpoint as ckpt
from megaslim.errors import MegaslimError
from megaslim.sparsity.linears import local_linears

MASKS_KEY = "sparsity_masks"  # the sharded_extra entry of a checkpoint
_PREFIX = "sparsity_mask."  # prepended to each weight's checkpoint key


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
    return ckpt.read_meta(path).get("extra", {}).get("sparsity")


def load_masks(model, path) -> dict[str, torch.Tensor]:
    """This rank's masks from a sparse checkpoint (any TP/PP it was saved at). Collective."""
    from megatron.core import dist_checkpointing

    meta = ckpt.verify(path)
    if MASKS_KEY not in meta.get("sharded_extra", []):
        raise MegaslimError(f"checkpoint {meta['path']} holds no sparsity masks")
    request = sharded_masks(model, local_mask_templates(model), for_loading=True)
    try:
        with ckpt.quiet_megatron_internals():
            loaded = dist_checkpointing.load({MASKS_KEY: request}, meta["path"])
    except BaseException as err:  # DCP raises a BaseException subclass
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        text = str(err).strip()
        raise MegaslimError(f"checkpoint {meta['path']}: its sparsity masks do not load into this model "
                            f"({type(err).__name__}: {text.splitlines()[0][:300] if text else ''})") from err
    return {k: v.bool() for k, v in loaded[MASKS_KEY].items()}

"""The decoder linears that sparsity prunes (linear_qkv, linear_proj, linear_fc1, linear_fc2 of every
layer; embeddings and the output layer stay dense, as in Wanda), found on this rank's model shard with
the tensor-parallel layout `megaslim.model.layout` gives each of them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megaslim.errors import MegaslimError
from megaslim.model.layout import Layout, layout_of

# (parent module, linear) of each decoder layer
LINEARS = (("self_attention", "linear_qkv"), ("self_attention", "linear_proj"),
           ("mlp", "linear_fc1"), ("mlp", "linear_fc2"))
NAMES = tuple(n for _, n in LINEARS)


@dataclass
class Linear:
    layer: int  # global layer index
    name: str  # linear_qkv | linear_proj | linear_fc1 | linear_fc2
    module: torch.nn.Module
    param_name: str  # its weight's name in model.named_parameters() / sharded_state_dict()
    layout: Layout  # how megatron splits the weight over TP: COLUMN / GATED = output rows, ROW = inputs

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


def local_linears(model) -> list[Linear]:
    """This rank's (pipeline stage's) decoder linears, in layer order."""
    params = dict(model.named_parameters())
    gated = bool(model.config.gated_linear_unit)
    out = []
    for i, layer in enumerate(model.decoder.layers):
        for parent, name in LINEARS:
            mod = getattr(getattr(layer, parent), name)
            pname = f"decoder.layers.{i}.{parent}.{name}.weight"
            if params.get(pname) is not mod.weight:
                raise MegaslimError(f"sparsity: {pname} is not the weight of {parent}.{name} (unexpected model layout)")
            out.append(Linear(layer.layer_number - 1, name, mod, pname, layout_of(pname, gated=gated)))
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

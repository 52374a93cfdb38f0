"""`ImportanceScores`: full logical score tensors + settings; saved as safetensors, reloadable."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megaslim import io as mio
from megaslim.errors import MegaslimError
from megaslim.importance.experts import EXPERT_TENSORS, expert_shapes
from megaslim.model.arch import ModelArch

TENSORS = ("heads", "query_groups", "neurons", "channels", "layer_bi", "layer_loss", "layer_block_loss",
           "layer_greedy", *EXPERT_TENSORS)
REQUIRED = TENSORS[:5]  # the optional ones: files written before they existed, or metrics not asked for


@dataclass
class ImportanceScores:
    heads: torch.Tensor  # [layers, heads]
    query_groups: torch.Tensor  # [layers, groups]
    neurons: torch.Tensor  # [layers, ffn]
    channels: torch.Tensor  # [hidden]
    layer_bi: torch.Tensor  # [layers]
    layer_loss: Optional[torch.Tensor] = None  # [layers]; loss increase when the layer is skipped
    # [k, layers]: loss increase with layers i..i+s-1 removed at [s-1, i] (block_loss; inf past the end,
    # NaN for sizes not scanned); k = settings["block_drop"]
    layer_block_loss: Optional[torch.Tensor] = None
    layer_greedy: Optional[torch.Tensor] = None  # [layers]: greedy_loss removal step, inf for kept layers
    # mixtures of experts (megaslim.importance.experts): [layers, experts], expert_neurons [layers, experts, ffn]
    expert_reap: Optional[torch.Tensor] = None
    expert_l2: Optional[torch.Tensor] = None
    expert_frequency: Optional[torch.Tensor] = None
    expert_weight: Optional[torch.Tensor] = None
    expert_neurons: Optional[torch.Tensor] = None
    shared_expert_neurons: Optional[torch.Tensor] = None  # [layers, shared ffn] (Qwen2-MoE's shared expert)
    settings: dict = field(default_factory=dict)

    def shapes_ok(self, arch: ModelArch) -> list[str]:
        want = {
            "heads": (arch.num_layers, arch.num_attention_heads),
            "query_groups": (arch.num_layers, arch.num_query_groups),
            "neurons": (arch.num_layers, arch.ffn_hidden_size),
            "channels": (arch.hidden_size,),
            "layer_bi": (arch.num_layers,),
            "layer_loss": (arch.num_layers,),
            "layer_greedy": (arch.num_layers,),
        }
        if self.layer_block_loss is not None:
            want["layer_block_loss"] = (self.layer_block_loss.shape[0], arch.num_layers)
        if arch.is_moe:
            want.update(expert_shapes(arch))
        bad = []
        for name, shape in want.items():
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                bad.append(f"{name} {tuple(t.shape)} != {shape}")
        return bad

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {n: getattr(self, n).float().contiguous() for n in TENSORS if getattr(self, n) is not None}
        with mio.atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"settings": json.dumps(self.settings)})
        return path

    @classmethod
    def load(cls, path: str | Path, arch: Optional[ModelArch] = None) -> "ImportanceScores":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MegaslimError(f"importance.scores_path={path}: no such file")
        try:
            with safe_open(str(path), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                settings = json.loads((f.metadata() or {}).get("settings", "{}"))
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise MegaslimError(f"{path}: not a readable importance scores file ({err})") from None
        missing = [n for n in REQUIRED if n not in tensors]
        if missing:
            raise MegaslimError(f"{path}: missing score tensors {missing}")
        scores = cls(**{n: tensors.get(n) for n in TENSORS}, settings=settings)
        if arch is not None:
            bad = scores.shapes_ok(arch)
            if bad:
                raise MegaslimError(f"{path} was computed for a model of another shape: " + "; ".join(bad))
        return scores

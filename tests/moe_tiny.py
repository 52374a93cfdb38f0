"""Tiny random HF mixtures of experts (Mixtral, Qwen3-MoE, Qwen2-MoE) for tests, from transformers config classes."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128
# what each family adds, made to matter: Qwen3-MoE QK-norm + renormalised top-k; Qwen2-MoE QKV bias, softmax
# top-k without renormalising, a gated shared expert; Mixtral top-k renormalised, tied embeddings
FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, tie=True),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=48,
                      norm_topk_prob=True, tie=False),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=48,
                      shared_expert_intermediate_size=24, norm_topk_prob=False, tie=False, random_biases=True),
}


def make_tiny_moe(path: str | Path, family: str, *, seed: int = 0, layers: int = 2, **config) -> Path:
    """A tiny random HF MoE of `family` (hidden 32, 4 heads in 2 groups of head_dim 8, 4 experts, top-2)
    whose router weights are drawn wide (std 1), so routing is decisive rather than near ties."""
    from tiny import make_tiny_llama
    from transformers import AutoModelForCausalLM

    kw = {**FAMILIES[family], **config}
    path = make_tiny_llama(path, family=family, seed=seed, layers=layers, hidden=32, heads=4, groups=2,
                           head_dim=8, vocab=VOCAB, **kw)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and "proj" not in name:  # routers and the shared expert's gate
                p.normal_()
    model.save_pretrained(str(path), safe_serialization=True)
    return path

"""`ModelArch`: the shape of a decoder (Llama family, Nemotron, or a mixture of experts), independent of where its
weights come from."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from megaslim.errors import MegaslimError


@dataclass
class ModelArch:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int  # head_dim, always explicit: hidden/heads is wrong once hidden is pruned
    vocab_size: int
    max_position_embeddings: int = 2048
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False
    family: str = "llama"  # HF model_type the weights came from (llama | mistral | qwen2 | qwen3 | nemotron)
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    rope_scaling: Optional[dict] = field(default=None)
    # Fields below were added for Nemotron; `to_dict` leaves them out while they hold the Llama defaults, so
    # architectures written before they existed (plans, checkpoints, offline-logit metadata) compare equal.
    gated: bool = True  # linear_fc1 = [gate; up] (SwiGLU); False: one up projection (fc1 rows = neurons)
    activation: str = "silu"  # silu | relu2 (squared ReLU)
    normalization: str = "RMSNorm"  # RMSNorm | LayerNorm1P (LayerNorm with bias, scale stored w, applied 1 + w)
    rotary_percent: float = 1.0  # fraction of head_dim that RoPE rotates (Nemotron: partial_rotary_factor)
    # Mixture of experts (every layer's MLP is an MoE layer when num_moe_experts is set); left out of
    # `to_dict` at their defaults like the fields above. Names follow megatron's TransformerConfig.
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # each routed expert's FFN width
    moe_shared_expert_intermediate_size: Optional[int] = None  # Qwen2-MoE's always-on shared expert
    moe_shared_expert_gate: bool = False  # shared expert output scaled by sigmoid(x . w_gate)
    moe_router_score_function: str = "softmax"
    # True: softmax over all experts, then top-k without renormalising (HF norm_topk_prob=false);
    # False: softmax over the top-k logits, i.e. the top-k probabilities renormalised (Mixtral, norm_topk_prob)
    moe_router_pre_softmax: bool = False
    moe_aux_loss_coeff: float = 0.0  # load-balancing loss coefficient (HF router_aux_loss_coef)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for f in _OPTIONAL_FIELDS:
            if d[f.name] == f.default:
                del d[f.name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArch":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise MegaslimError(f"unknown model architecture fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def is_moe(self) -> bool:
        return bool(self.num_moe_experts)

    def num_params(self) -> int:
        """Parameter count of the HF model (unpadded vocab; tied embeddings counted once)."""
        return self._count(self.num_moe_experts or 0)

    def num_active_params(self) -> int:
        """Parameters one token runs through: the top-k routed experts instead of all of them."""
        return self._count(self.moe_router_topk if self.is_moe else 0)

    def _count(self, experts: int) -> int:
        h, f, hd = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        q, kv = self.num_attention_heads * hd, self.num_query_groups * hd
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        attn += 2 * hd if self.qk_layernorm else 0
        norm = 2 * h if self.normalization == "LayerNorm1P" else h  # weight (+ bias)
        mats = 3 if self.gated else 2
        mlp = mats * h * f
        if self.is_moe:
            shared = self.moe_shared_expert_intermediate_size or 0
            mlp = (experts * mats * h * self.moe_ffn_hidden_size + self.num_moe_experts * h  # router
                   + mats * h * shared + (h if self.moe_shared_expert_gate else 0))
        per_layer = attn + mlp + 2 * norm
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + norm


_OPTIONAL_FIELDS = [f for f in dataclasses.fields(ModelArch)
                    if f.name in ("gated", "activation", "normalization", "rotary_percent")
                    or f.name.startswith(("num_moe_", "moe_"))]


def check_parallel_layout(arch: ModelArch, tp: int, pp: int, ep: int = 1) -> None:
    """Refuse TP/PP/EP layouts megatron would mis-shard, before any compute."""
    problems = _moe_layout_problems(arch, tp, ep)
    if arch.num_attention_heads % arch.num_query_groups:
        problems.append(
            f"num_attention_heads={arch.num_attention_heads} is not a multiple of "
            f"num_query_groups={arch.num_query_groups}"
        )
    if arch.num_query_groups < tp:
        problems.append(
            f"num_query_groups={arch.num_query_groups} < TP={tp} (megatron would shard through a group)"
        )
    for name in _tp_split(arch):
        if getattr(arch, name) % tp:
            problems.append(f"{name}={getattr(arch, name)} is not divisible by TP={tp}")
    if arch.num_layers % pp:
        problems.append(f"num_layers={arch.num_layers} is not divisible by PP={pp}")
    if problems:
        divisors = [d for d in range(1, arch.num_query_groups + 1) if _fits(arch, d)]
        raise MegaslimError(
            f"parallel layout TP={tp} PP={pp}{f' EP={ep}' if ep > 1 else ''} does not fit the model: "
            + "; ".join(problems)
            + f". TP sizes that fit: {divisors}"
        )


def _moe_layout_problems(arch: ModelArch, tp: int, ep: int) -> list[str]:
    """Experts are split whole over EP ranks, and each expert's (and the shared expert's) FFN over TP."""
    if not arch.is_moe:
        return [f"expert parallelism EP={ep} needs a mixture-of-experts model"] if ep > 1 else []
    problems = []
    if arch.num_moe_experts % ep:
        problems.append(f"num_moe_experts={arch.num_moe_experts} is not divisible by EP={ep}")
    for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
        if (getattr(arch, name) or 0) % tp:
            problems.append(f"{name}={getattr(arch, name)} is not divisible by TP={tp}")
    return problems


def _fits(arch: ModelArch, tp: int) -> bool:
    return all(getattr(arch, n) % tp == 0 for n in _tp_split(arch)) and not _moe_layout_problems(arch, tp, 1)


def _tp_split(arch: ModelArch) -> tuple[str, ...]:
    """Sizes TP splits (an MoE model has no dense MLP: its experts' sizes are checked on their own)."""
    dense = () if arch.is_moe else ("ffn_hidden_size",)
    return ("num_attention_heads", "num_query_groups", *dense)


# megatron's llama3 RoPE scaling takes only `factor`; the other parameters are fixed to these values.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def check_rope_scaling(scaling: Optional[dict]) -> None:
    """Refuse RoPE scaling megatron-core would not reproduce: only llama3 (with its fixed parameters)."""
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise MegaslimError(
            f"RoPE scaling rope_type={kind!r} is not supported (only 'llama3' is implemented): {scaling}")
    off = {k: scaling[k] for k, v in LLAMA3_ROPE_FIXED.items() if k in scaling and float(scaling[k]) != v}
    if off:
        raise MegaslimError(
            f"llama3 RoPE scaling with {off} is not supported: megatron-core fixes {LLAMA3_ROPE_FIXED}")

"""The closed vocabularies of the config: `str` Enums whose members behave as their string values."""
from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A config value from a fixed set. Members compare, hash, print and serialise (json, YAML) as
    their values, so `cfg.distill.kl == "forward"` and `{"forward": ...}[cfg.distill.kl]` keep working.
    OmegaConf 2.4 (pinned) accepts a member's name or its value; values such as `2:4` need the latter."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:  # error messages show 'forward', as they did for plain strings
        return repr(self.value)

    def __hash__(self) -> int:  # Enum hashes the member name; a dict keyed by values must find members
        return hash(self.value)

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]


class TransformerImpl(Choice):
    local = "local"
    transformer_engine = "transformer_engine"
    modelopt = "modelopt"  # TE norms + separate linears


class DType(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Aggregation(Choice):
    mean = "mean"
    l2 = "l2"
    var = "var"


class NeuronSignal(Choice):
    fc2_input = "fc2_input"
    fc1_output = "fc1_output"


class LayerMetric(Choice):
    bi = "bi"  # Block Importance (ShortGPT): 1 - cos(layer input, layer output), each layer alone
    loss = "loss"  # LM loss increase with one layer skipped, each layer alone
    block_loss = "block_loss"  # loss with each contiguous block of the layers to drop removed (joint)
    greedy_loss = "greedy_loss"  # remove layers a few at a time, re-scoring the rest after each round


class CoreAttention(Choice):
    sdpa = "sdpa"  # torch scaled_dot_product_attention (flash kernels on GPU through torch)
    local = "local"  # megatron's own DotProductAttention (its AttnBackend.local)


class ExpertMetric(Choice):
    """How prune.export_config.num_moe_experts ranks experts (megaslim.importance.experts)."""
    reap = "reap"  # sum over routed tokens of router weight x |expert output| (REAP-style)
    l2 = "l2"  # L2 over routed tokens of |expert output| (the router weight left out)
    frequency = "frequency"  # fraction of tokens routed to the expert


class SearchAxis(Choice):
    num_layers = "num_layers"
    hidden_size = "hidden_size"
    ffn_hidden_size = "ffn_hidden_size"
    num_attention_heads = "num_attention_heads"
    num_moe_experts = "num_moe_experts"  # MoE axes (ModelOpt's names); a dense model has none to skip
    moe_ffn_hidden_size = "moe_ffn_hidden_size"
    moe_shared_expert_intermediate_size = "moe_shared_expert_intermediate_size"


class SparsityMethod(Choice):
    magnitude = "magnitude"
    wanda = "wanda"


class SparsityPattern(Choice):
    unstructured = "unstructured"
    two_four = "2:4"


class FoldMode(Choice):
    proj_sum = "proj_sum"
    laco = "laco"


class KLKind(Choice):
    forward = "forward"
    reverse = "reverse"
    jsd = "jsd"
    topk = "topk"


class IntermediateLoss(Choice):
    cosine = "cosine"
    mse = "mse"
    contrastive = "contrastive"  # InfoNCE over the micro-batch's positions


class Fp8Mode(Choice):
    e4m3 = "e4m3"
    hybrid = "hybrid"


class Fp8Recipe(Choice):
    delayed = "delayed"
    tensorwise = "tensorwise"
    current = "current"  # documented alias of tensorwise (megaslim.distill.fp8.ALIASES maps it)
    blockwise = "blockwise"
    mxfp8 = "mxfp8"


class AmaxAlgo(Choice):
    max = "max"
    most_recent = "most_recent"


class CompressTeacher(Choice):
    original = "original"
    previous = "previous"

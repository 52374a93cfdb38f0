"""The dry-run planner's shape arithmetic: where a model's shape comes from, and what it holds per GPU.

Shapes come from `--hf-config PATH` when given, else from `model.load`'s config.json (or a megaslim
checkpoint's metadata) when that path exists, else, with model.load unset, from the embedded default's
config.json shipped in this package (megaslim/commands/hf_configs/), else by name from
`hf_configs/<basename of model.load>.json` beside the config file or in `configs/recipes/hf_configs/`
of the working directory (a checkout: the recipes' published source-model configs).

Memory in bytes; P_rank = parameters held by one GPU: TP-sharded linears and vocab-padded embeddings,
replicated norms, its pipeline stage only:

  weights           P_rank * w                      w = 2 (bf16/fp16) | 4 (fp32) = model.params_dtype
  gradients         P_rank * 4                      megaslim's DDP reduces grads in fp32
  optimizer (Adam)  P_rank * (12 | 8) / DP          fp32 master copy (absent when w = 4) + 2 moments;
                                                    megatron's distributed optimizer shards it when DP > 1
                                                    (an MoE's experts over the expert-DP group, DP / EP)
  teacher           P_rank(teacher) * w             frozen: no gradients, no optimizer state
  activations       per layer and micro-batch, stored for backward (Korthikanti et al. 2022's count,
                    TP without sequence parallelism or recompute; under parallel.sequence_parallel an upper bound):
                      w * s*b * (4h + (2q + 2kv + (m+1)f) / TP)  [+ w * a*s^2*b / TP without flash attention]
                    q = heads*head_dim, kv = groups*head_dim, m = 2 for SwiGLU (gate+up), 1 otherwise.
                    (Megatron's GPT estimate s*b*h*(34 + 5*a*s/h) is the same count for MHA, GeLU with
                    ffn = 4h and dropout masks.) A pipeline stage keeps min(PP - stage, micro-batches)
                    micro-batches in flight (1F1B), each of (layers / PP) layers.
  teacher activations  one layer's working set (forward under no_grad), plus under PP the teacher
                    half of the [student | teacher] tensors each stage keeps per in-flight micro-batch
  KD logits         s*b*V_padded/TP * (2w + 20): student and teacher logits plus ~5 float32
                    vocab-sized temporaries of the KL (last pipeline stage)
  overhead          a flat --overhead-gib (CUDA context, NCCL buffers, allocator fragmentation)

Parameters are ModelArch.num_params (exact HF counts; an MoE's active count, ModelArch.num_active_params, beside
it) and forward FLOPs/token are megaslim.prune.plan.flops_per_token (attention over the full sequence, logits
included; an MoE's top-k experts, shared expert and router).
"""
from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Optional

from megaslim import checkpoint
from megaslim.config import Config
from megaslim.errors import MegaslimError
from megaslim.model.arch import ModelArch
from megaslim.model.hf import arch_from_hf_config

GIB = 2 ** 30
EMBEDDED_DEFAULT = "SmolLM2-135M-Instruct"  # what an unset model.load loads (megaslim.sources)
RECIPE_HF_CONFIGS = Path("configs") / "recipes" / "hf_configs"  # relative to the working directory


class PlanError(MegaslimError):
    """A layout or target the planner refuses: the message says why and what to change."""


# -- where the shape comes from ------------------------------------------------------------------


def _read_hf(path) -> ModelArch:
    return arch_from_hf_config(json.loads(path.read_text()))


def _hf_config_flag(hf_config: str) -> tuple[ModelArch, str]:
    p = Path(hf_config)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise PlanError(f"--hf-config {hf_config}: no such file")
    return _read_hf(p), f"--hf-config {p}"


def _existing_load(load: str) -> tuple[ModelArch, str]:
    path = Path(load).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _read_hf(path / "config.json"), f"model.load {path}/config.json"
    if path.is_dir() and checkpoint.is_checkpoint(path):
        return ModelArch.from_dict(checkpoint.read_meta(path)["arch"]), \
            f"model.load {path} (megaslim checkpoint metadata)"
    raise PlanError(f"model.load={load}: the dry run reads shapes from an HF directory's config.json or a "
                    "megaslim checkpoint; for anything else (e.g. a .gguf) pass --hf-config PATH")


def _embedded_default() -> tuple[ModelArch, str]:
    # package data, so that an installed wheel plans the default without a checkout
    shipped = resources.files("megaslim.commands") / "hf_configs" / f"{EMBEDDED_DEFAULT}.json"
    return _read_hf(shipped), f"megaslim's {EMBEDDED_DEFAULT} config (model.load unset: the embedded default)"


def name_candidates(load: str, config_path: Optional[Path]) -> list[Path]:
    """Where a model.load that does not exist here is looked up by its name, in order."""
    name = Path(str(load).rstrip("/")).name
    if name.endswith(".gguf"):
        name = name[:-5]
    dirs = ([config_path.resolve().parent / "hf_configs"] if config_path else []) + [RECIPE_HF_CONFIGS.resolve()]
    return list(dict.fromkeys(d / f"{name}.json" for d in dirs))


def source_shape(cfg: Config, *, hf_config: Optional[str] = None,
                 config_path: Optional[str | Path] = None) -> tuple[ModelArch, str]:
    """(shape of model.load, where it came from). Never reads weights."""
    load = cfg.model.load
    if hf_config:
        return _hf_config_flag(hf_config)
    if load is None:
        return _embedded_default()
    if Path(load).expanduser().exists():
        return _existing_load(load)
    candidates = name_candidates(load, Path(config_path) if config_path else None)
    for p in candidates:
        if p.is_file():
            return _read_hf(p), f"{_rel(p)} (model.load {load} does not exist here; matched by its name)"
    raise PlanError(
        f"model.load={load} does not exist here and no HF config.json was found for it (looked for "
        f"{', '.join(str(_rel(p)) for p in candidates)}); pass --hf-config PATH (an HF config.json or its directory)")


def _rel(p: Path) -> Path:
    try:
        return p.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return p


# -- counts --------------------------------------------------------------------------------------


def hf_heads_rule(arch: ModelArch) -> bool:
    """transformers' Llama-family configs require hidden % heads == 0; NemotronConfig does not."""
    return arch.family != "nemotron"


def dtype_bytes(cfg: Config) -> int:
    return 4 if cfg.model.params_dtype == "float32" else 2


def embedding_params(arch: ModelArch) -> int:
    return arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)


def padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)


def _norm_params(arch: ModelArch) -> int:
    return arch.hidden_size * (2 if arch.normalization == "LayerNorm1P" else 1)  # weight (+ bias)


def _layer_params_rank(arch: ModelArch, tp: int, ep: int = 1) -> int:
    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.kv_channels
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    mats = 3 if arch.gated else 2
    linear = h * (q + 2 * kv) + q * h + mats * h * f
    bias = q + 2 * kv if arch.qkv_bias else 0
    norms = 2 * _norm_params(arch) + (2 * hd if arch.qk_layernorm else 0)
    replicated = 0
    if arch.is_moe:  # each GPU holds experts / EP experts, TP-split like a dense MLP; the router is replicated
        shared = arch.moe_shared_expert_intermediate_size or 0
        linear = (h * (q + 2 * kv) + q * h + arch.num_moe_experts // ep * mats * h * arch.moe_ffn_hidden_size
                  + mats * h * shared)
        replicated = arch.num_moe_experts * h + (h if arch.moe_shared_expert_gate else 0)
    return (linear + bias) // tp + norms + replicated


def stage_params_rank(arch: ModelArch, *, tp: int, pp: int, stage: int, divisible_by: int, ep: int = 1) -> int:
    """Parameters one GPU of pipeline stage `stage` holds (megatron's GPTModel shard; an MoE's experts split
    over `ep` ranks)."""
    vp = padded_vocab(arch.vocab_size, divisible_by, tp)
    n = (arch.num_layers // pp) * _layer_params_rank(arch, tp, ep)
    if stage == 0:
        n += vp * arch.hidden_size // tp
    if stage == pp - 1:
        n += _norm_params(arch)
        if not arch.tie_word_embeddings or pp > 1:  # tied under PP: the last stage keeps its own copy
            n += vp * arch.hidden_size // tp
    return n


def expert_params_rank(arch: ModelArch, *, tp: int, pp: int, ep: int) -> int:
    """The routed experts' share of stage_params_rank (the same on every stage)."""
    if not arch.is_moe:
        return 0
    mats = 3 if arch.gated else 2
    per_layer = arch.num_moe_experts // ep * mats * arch.hidden_size * arch.moe_ffn_hidden_size // tp
    return (arch.num_layers // pp) * per_layer


def layer_activation_elems(arch: ModelArch, *, s: int, b: int, tp: int, flash: bool) -> int:
    """Activation elements one transformer layer stores for backward, per GPU (TP without SP). An MoE layer
    stores each token's top-k experts' and the shared expert's FFN activations (EP moves tokens to their
    experts: on average a GPU holds its own tokens' count)."""
    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.kv_channels
    if arch.is_moe:
        f = arch.moe_router_topk * arch.moe_ffn_hidden_size + (arch.moe_shared_expert_intermediate_size or 0)
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    m = 2 if arch.gated else 1
    n = s * b * (4 * h + (2 * q + 2 * kv + (m + 1) * f) // tp)
    if not flash:
        n += arch.num_attention_heads * s * s * b // tp
    return n


# -- memory per GPU ------------------------------------------------------------------------------


def in_flight(pp: int, stage: int, micro: int) -> int:
    return max(1, min(pp - stage, micro))


def forward_memory(cfg: Config, arch: ModelArch, *, tp: int, pp: int, b: int, flash: bool,
                   overhead: float, ep: int = 1) -> tuple[float, dict]:
    """Peak GPU bytes of a forward-only pass (importance / evaluation): weights + one layer's working set
    + the last stage's logits (bf16 + float32 upcast + log-softmax)."""
    s, w = cfg.data.seq_length, dtype_bytes(cfg)
    div = cfg.model.make_vocab_size_divisible_by
    vp = padded_vocab(arch.vocab_size, div, tp)
    worst = (0.0, {})
    for st in range(pp):
        parts = {
            "weights": stage_params_rank(arch, tp=tp, pp=pp, stage=st, divisible_by=div, ep=ep) * w,
            "activations": layer_activation_elems(arch, s=s, b=b, tp=tp, flash=flash) * w
            + (s * b * arch.hidden_size * w if st > 0 else 0),
            "logits": s * b * vp // tp * (w + 8) if st == pp - 1 else 0,
        }
        total = sum(parts.values()) + overhead
        if total > worst[0]:
            worst = (total, dict(parts, stage=st))
    return worst


def distill_memory(cfg: Config, student: ModelArch, teacher: ModelArch, *, tp: int, pp: int, dp: int,
                   micro: int, flash: bool, overhead: float, ep: int = 1) -> tuple[float, dict]:
    """Peak GPU bytes of a distillation step, on the pipeline stage that needs the most."""
    s, b, w = cfg.data.seq_length, cfg.train.micro_batch_size, dtype_bytes(cfg)
    div = cfg.model.make_vocab_size_divisible_by
    vp = padded_vocab(student.vocab_size, div, tp)
    hs, ht = student.hidden_size, teacher.hidden_size
    per_layer = layer_activation_elems(student, s=s, b=b, tp=tp, flash=flash) * w
    teacher_layer = layer_activation_elems(teacher, s=s, b=b, tp=tp, flash=flash) * w
    opt_bytes = 12 if w < 4 else 8
    stages = []
    for st in range(pp):
        p_s = stage_params_rank(student, tp=tp, pp=pp, stage=st, divisible_by=div, ep=ep)
        p_t = stage_params_rank(teacher, tp=tp, pp=pp, stage=st, divisible_by=div, ep=ep)
        p_e = expert_params_rank(student, tp=tp, pp=pp, ep=ep)
        fly = in_flight(pp, st, micro)
        buffers = fly * s * b * ((ht if st > 0 else 0) + (hs + ht if st < pp - 1 else 0)) * w
        parts = {
            "student weights": p_s * w,
            "student grads": p_s * 4,
            # the distributed optimizer shards dense parameters over DP, experts over the expert-DP group (DP / EP)
            "optimizer state": (p_s - p_e) * opt_bytes / dp + p_e * opt_bytes / max(1, dp // ep),
            "teacher weights": p_t * w,
            "student activations": fly * (student.num_layers // pp) * per_layer
            + (s * b * 2 * hs * w if st == pp - 1 else 0),
            "teacher activations": teacher_layer + buffers,
            "KD logits": s * b * vp // tp * (2 * w + 20) if st == pp - 1 else 0,
            "overhead": overhead,
        }
        # for information (megaslim does not expose recompute): each layer keeps only its input, and one
        # layer's full working set exists during its recomputation
        full = fly * (student.num_layers // pp) * s * b * hs * w + per_layer
        stages.append((sum(parts.values()), dict(parts, stage=st, in_flight=fly, params_rank=p_s,
                                                  teacher_params_rank=p_t, **{"full recompute": full})))
    return max(stages, key=lambda x: x[0])

"""The one table between Megatron-LM's saved `args` (pretrain_gpt.py flags) and megaslim's `ModelArch`,
both ways, and the Megatron-LM options megaslim cannot express, each refused by name."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

from megaslim.errors import MegaslimError
from megaslim.model.arch import LLAMA3_ROPE_FIXED, ModelArch

# ModelArch field <- Megatron-LM args attribute(s), first one present and not None wins
# (0.17+ saves --norm-epsilon as layernorm_epsilon, older releases as norm_epsilon).
PLAIN: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("num_layers", ("num_layers",)),
    ("hidden_size", ("hidden_size",)),
    ("ffn_hidden_size", ("ffn_hidden_size",)),
    ("num_attention_heads", ("num_attention_heads",)),
    ("kv_channels", ("kv_channels",)),
    ("max_position_embeddings", ("max_position_embeddings", "seq_length")),
    ("rotary_base", ("rotary_base",)),
    ("rotary_percent", ("rotary_percent",)),
    ("norm_epsilon", ("layernorm_epsilon", "norm_epsilon")),
    ("qkv_bias", ("add_qkv_bias",)),
    ("qk_layernorm", ("qk_layernorm",)),
)
_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads")
# ModelArch MoE field <- Megatron-LM args attribute (the same names: both are TransformerConfig's), read when
# --num-experts is set; megatron's defaults where a field is absent
MOE: tuple[tuple[str, str], ...] = (
    ("num_moe_experts", "num_experts"),
    ("moe_router_topk", "moe_router_topk"),
    ("moe_ffn_hidden_size", "moe_ffn_hidden_size"),
    ("moe_shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"),
    ("moe_shared_expert_gate", "moe_shared_expert_gate"),
    ("moe_router_score_function", "moe_router_score_function"),
    ("moe_router_pre_softmax", "moe_router_pre_softmax"),
    ("moe_aux_loss_coeff", "moe_aux_loss_coeff"),
)


def _on(v: Any) -> bool:
    return bool(v) and v != "none"


# Megatron-LM option -> (is it in use?, what it is). Refused by name before any tensor is read.
UNSUPPORTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("multi_latent_attention", _on, "multi-latent attention (MLA)"),
    ("mtp_num_layers", _on, "multi-token prediction (MTP)"),
    ("hybrid_layer_pattern", _on, "a Mamba/hybrid model"),
    ("hybrid_override_pattern", _on, "a Mamba/hybrid model"),
    ("is_hybrid_model", _on, "a Mamba/hybrid model"),
    ("heterogeneous_layers_config_path", _on, "heterogeneous layers"),
    ("heterogeneous_layers_config_encoded_json", _on, "heterogeneous layers"),
    ("experimental_attention_variant", _on, "an experimental attention variant"),
    ("linear_attention_freq", _on, "linear attention layers"),
    ("add_bias_linear", _on, "biases on every linear layer (megaslim models use --disable-bias-linear)"),
    ("rotary_interleaved", _on, "interleaved RoPE"),
    ("rotary_seq_len_interpolation_factor", _on, "RoPE sequence-length interpolation"),
    ("no_rope_freq", _on, "layers without RoPE"),
    ("window_size", _on, "sliding-window attention"),
    ("attention_output_gate", _on, "a gated attention output"),
    ("qk_l2_norm", _on, "L2-normalized queries and keys"),
    ("softmax_type", lambda v: v not in (None, "vanilla"), "a non-vanilla attention softmax"),
    ("openai_gelu", _on, "an OpenAI-GeLU MLP"),
    ("quick_geglu", _on, "a quick-GeGLU MLP"),
    ("spec", lambda v: v not in (None, [], ["local"], "local"), "a custom layer spec (--spec; `local` is fine)"),
)


def _not(*fine: Any) -> Callable[[Any], bool]:
    return lambda v: v is not None and v not in fine


# MoE options megaslim's MoE layers do not build (checked when --num-experts is set), refused by name
UNSUPPORTED_MOE: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("moe_layer_freq", lambda v: v is not None and v != 1 and (not isinstance(v, list) or not all(x == 1 for x in v)),
     "mixed dense and MoE layers"),
    ("moe_router_num_groups", _on, "grouped top-k routing"),
    ("moe_router_group_topk", _on, "grouped top-k routing"),
    ("moe_router_topk_scaling_factor", _not(1, 1.0), "a routed-expert scaling factor"),
    ("moe_router_enable_expert_bias", _on, "router expert bias (aux-loss-free balancing)"),
    ("moe_input_jitter_eps", _on, "router input jitter"),
    ("moe_router_score_function", _not("softmax"), "a non-softmax router score"),
    ("moe_router_load_balancing_type", _not("aux_loss", "seq_aux_loss", "global_aux_loss", "none"),
     "this load-balancing routing (megaslim routes by top-k)"),
    ("moe_expert_capacity_factor", _on, "expert capacity (token dropping)"),
    ("moe_aux_loss_coeff", lambda v: isinstance(v, (list, tuple)) and len(set(v)) > 1,
     "several load-balancing coefficients"),
)

# (swiglu, squared_relu) -> ModelArch (gated, activation); neither is GeLU, which megaslim does not build
_ACTIVATIONS = {(True, False): (True, "silu"), (False, True): (False, "relu2")}


def get(args: argparse.Namespace, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(args, n, None)
        if v is not None:
            return v
    return default


def refuse_unsupported(args: argparse.Namespace, where: str) -> None:
    """One line naming every Megatron-LM option in use that megaslim cannot express."""
    table = UNSUPPORTED + (UNSUPPORTED_MOE if _on(getattr(args, "num_experts", None)) else ())
    found = [f"{n}={getattr(args, n)!r} ({what})" for n, used, what in table if used(getattr(args, n, None))]
    pos = "rope" if getattr(args, "use_rotary_position_embeddings", False) else get(args, "position_embedding_type")
    if pos != "rope":
        found.append(f"position_embedding_type={pos!r} (megaslim models use RoPE)")
    norm = get(args, "normalization", default="LayerNorm")
    if norm not in ("RMSNorm", "LayerNorm") or (norm == "LayerNorm" and not getattr(args, "apply_layernorm_1p", False)):
        found.append(f"normalization={norm!r} (megaslim builds RMSNorm or LayerNorm with --apply-layernorm-1p)")
    act = (bool(getattr(args, "swiglu", False)), bool(getattr(args, "squared_relu", False)))
    if act not in _ACTIVATIONS:
        found.append("an MLP that is neither --swiglu nor --squared-relu (GeLU)")
    missing = [n for n in _REQUIRED if getattr(args, n, None) is None]
    if getattr(args, "group_query_attention", False) and getattr(args, "num_query_groups", None) is None:
        missing.append("num_query_groups")
    if missing:
        found.append(f"no {', '.join(missing)} in its args")
    if found:
        raise MegaslimError(f"{where}: this Megatron-LM checkpoint uses what megaslim cannot express: "
                            + "; ".join(found))


def _family(arch: dict) -> str:
    if arch.get("num_moe_experts"):  # the HF MoE family whose blocks match (for an HF export)
        return "qwen3_moe" if arch["qk_layernorm"] else "qwen2_moe" if arch.get(
            "moe_shared_expert_intermediate_size") else "mixtral"
    if arch["activation"] == "relu2":
        return "nemotron"
    return "qwen3" if arch["qk_layernorm"] else "qwen2" if arch["qkv_bias"] else "llama"


def arch_from_args(args: argparse.Namespace, where: str) -> ModelArch:
    """ModelArch of a Megatron-LM GPT model; `vocab_size` is args.vocab_size when set, else the padded
    vocabulary (Megatron-LM trains over every padded row: its loss runs over the padded vocabulary)."""
    refuse_unsupported(args, where)
    d = {field: get(args, *names) for field, names in PLAIN}
    d = {k: v for k, v in d.items() if v is not None}
    heads = d["num_attention_heads"]
    d["num_query_groups"] = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    d.setdefault("kv_channels", d["hidden_size"] // heads)
    d["gated"], d["activation"] = _ACTIVATIONS[(bool(getattr(args, "swiglu", False)),
                                                 bool(getattr(args, "squared_relu", False)))]
    d.setdefault("ffn_hidden_size", _default_ffn(d["hidden_size"], d["gated"]))
    d["normalization"] = "RMSNorm" if get(args, "normalization") == "RMSNorm" else "LayerNorm1P"
    d["tie_word_embeddings"] = not getattr(args, "untie_embeddings_and_output_weights", False)
    d["vocab_size"] = _vocab(args, where)
    d["rotary_base"] = float(d.get("rotary_base", 10000))
    if getattr(args, "use_rope_scaling", False):
        d["rope_scaling"] = {"rope_type": "llama3", "factor": float(get(args, "rope_scaling_factor", default=8.0)),
                             **LLAMA3_ROPE_FIXED}
    d.update(_moe_fields(args, d["ffn_hidden_size"]))
    d["family"] = _family({"qk_layernorm": False, "qkv_bias": False, **d})
    d.update({k: v for k, v in (getattr(args, "megaslim", None) or {}).items() if k in _EXTRAS})
    return ModelArch(**d)


def _moe_fields(args: argparse.Namespace, ffn: int) -> dict:
    """The MoE fields of ModelArch (none for a dense model); Megatron-LM's defaults where unset."""
    if not _on(getattr(args, "num_experts", None)):
        return {}
    d = {field: getattr(args, name) for field, name in MOE if getattr(args, name, None) is not None}
    d.setdefault("moe_ffn_hidden_size", ffn)  # validate_args: --moe-ffn-hidden-size defaults to ffn_hidden_size
    coeff = d.get("moe_aux_loss_coeff", 0.0)
    d["moe_aux_loss_coeff"] = float(coeff[0] if isinstance(coeff, (list, tuple)) else coeff)
    d["moe_shared_expert_gate"] = bool(d.get("moe_shared_expert_gate", False))
    return d


def _default_ffn(hidden: int, gated: bool) -> int:
    """Megatron-LM's validate_args default when --ffn-hidden-size is unset."""
    return int((4 * hidden * 2 / 3) / 64) * 64 if gated else 4 * hidden


def _vocab(args: argparse.Namespace, where: str) -> int:
    padded = getattr(args, "padded_vocab_size", None)
    if not isinstance(padded, int) or padded <= 0:
        raise MegaslimError(f"{where}: its args carry no padded_vocab_size; not a Megatron-LM GPT checkpoint")
    vocab = getattr(args, "vocab_size", None)
    return vocab if isinstance(vocab, int) and 0 < vocab <= padded else padded


# ModelArch fields Megatron-LM has no flag for, kept in args.megaslim so a round trip is exact
_EXTRAS = ("family", "bos_token_id", "eos_token_id")


def args_from_arch(arch: ModelArch, *, padded_vocab_size: int, divisible_by: int, tp: int, pp: int,
                   world_size: int, params_dtype, tokenizer_model: Optional[str], iteration: int,
                   ep: int = 1) -> argparse.Namespace:
    """The args a Megatron-LM run of this shape would save (the flags pretrain_gpt.py needs to continue)."""
    a = {names[0]: getattr(arch, field) for field, names in PLAIN}
    a["norm_epsilon"] = arch.norm_epsilon  # both names: Megatron-LM before and after 0.17
    base = float(arch.rotary_base)
    a["rotary_base"] = int(base) if base.is_integer() else base  # --rotary-base is an int flag
    gated, act = arch.gated, arch.activation
    a.update(
        group_query_attention=arch.num_query_groups != arch.num_attention_heads,
        num_query_groups=arch.num_query_groups, swiglu=gated and act == "silu", squared_relu=act == "relu2",
        normalization="RMSNorm" if arch.normalization == "RMSNorm" else "LayerNorm",
        apply_layernorm_1p=arch.normalization == "LayerNorm1P",
        untie_embeddings_and_output_weights=not arch.tie_word_embeddings,
        position_embedding_type="rope", use_rotary_position_embeddings=False, add_position_embedding=True,
        rotary_interleaved=False, use_rope_scaling=bool(arch.rope_scaling),
        rope_scaling_factor=float((arch.rope_scaling or {}).get("factor", 8.0)),
        add_bias_linear=False, vocab_size=arch.vocab_size, padded_vocab_size=padded_vocab_size,
        make_vocab_size_divisible_by=divisible_by, multi_latent_attention=False,
        mtp_num_layers=None, hybrid_layer_pattern=None, heterogeneous_layers_config_path=None, spec=None,
        seq_length=arch.max_position_embeddings, hidden_dropout=0.0, attention_dropout=0.0,
        apply_query_key_layer_scaling=False,
    )
    a.update(_moe_args(arch))
    a.update(_run_args(tp=tp, pp=pp, ep=ep, world_size=world_size, params_dtype=params_dtype,
                       tokenizer_model=tokenizer_model, iteration=iteration))
    a["megaslim"] = {k: getattr(arch, k) for k in _EXTRAS}
    return argparse.Namespace(**a)


def _moe_args(arch: ModelArch) -> dict:
    """--num-experts and the MoE flags of `arch` (num_experts=None for a dense model)."""
    if not arch.is_moe:
        return {"num_experts": None}
    return {**{name: getattr(arch, field) for field, name in MOE}, "moe_layer_freq": 1,
            "moe_router_load_balancing_type": "aux_loss", "moe_grouped_gemm": False,
            "moe_token_dispatcher_type": "allgather"}


def _run_args(*, tp: int, pp: int, ep: int, world_size: int, params_dtype, tokenizer_model: Optional[str],
              iteration: int) -> dict:
    """How the checkpoint was written: layout, dtype, tokenizer, and that it holds no optimizer or RNG state
    (Megatron-LM then skips loading them on its own: no_save_optim / no_save_rng)."""
    import torch

    return dict(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=ep, world_size=world_size, data_parallel_size=world_size // (tp * pp),
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        ckpt_format="torch_dist", use_dist_ckpt=True, no_save_optim=True, no_save_rng=True,
        tokenizer_type="HuggingFaceTokenizer" if tokenizer_model else None, tokenizer_model=tokenizer_model,
        iteration=iteration, consumed_train_samples=0, skipped_train_samples=0, consumed_valid_samples=0,
        data_parallel_random_init=False,
    )


# pretrain_gpt.py flag -> the args value it takes (valued flags) / the switch it sets (store_true flags)
_VALUED = (("--num-layers", "num_layers"), ("--hidden-size", "hidden_size"), ("--ffn-hidden-size", "ffn_hidden_size"),
           ("--num-attention-heads", "num_attention_heads"), ("--kv-channels", "kv_channels"),
           ("--max-position-embeddings", "max_position_embeddings"),
           ("--position-embedding-type", "position_embedding_type"), ("--rotary-base", "rotary_base"),
           ("--rotary-percent", "rotary_percent"), ("--normalization", "normalization"),
           ("--norm-epsilon", "layernorm_epsilon"), ("--padded-vocab-size", "padded_vocab_size"))
_SWITCHES = (("--swiglu", "swiglu"), ("--squared-relu", "squared_relu"), ("--apply-layernorm-1p", "apply_layernorm_1p"),
             ("--untie-embeddings-and-output-weights", "untie_embeddings_and_output_weights"),
             ("--add-qkv-bias", "add_qkv_bias"), ("--qk-layernorm", "qk_layernorm"), ("--bf16", "bf16"),
             ("--fp16", "fp16"))


def pretrain_gpt_flags(args: argparse.Namespace) -> list[str]:
    """The pretrain_gpt.py model flags that rebuild the shape `args` describe (besides --load/--finetune)."""
    flags = [str(x) for flag, name in _VALUED for x in (flag, getattr(args, name))]
    if args.group_query_attention:
        flags += ["--group-query-attention", "--num-query-groups", str(args.num_query_groups)]
    flags.append("--disable-bias-linear")
    flags += [flag for flag, name in _SWITCHES if getattr(args, name, False)]
    if args.use_rope_scaling:
        flags += ["--use-rope-scaling", "--rope-scaling-factor", str(args.rope_scaling_factor)]
    flags += _moe_flags(args)
    if args.tokenizer_model:
        flags += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(args.tokenizer_model)]
    return flags


_MOE_VALUED = (("--num-experts", "num_experts"), ("--moe-router-topk", "moe_router_topk"),
               ("--moe-ffn-hidden-size", "moe_ffn_hidden_size"),
               ("--moe-shared-expert-intermediate-size", "moe_shared_expert_intermediate_size"),
               ("--moe-router-score-function", "moe_router_score_function"),
               ("--moe-router-load-balancing-type", "moe_router_load_balancing_type"),
               ("--moe-aux-loss-coeff", "moe_aux_loss_coeff"))
_MOE_SWITCHES = (("--moe-shared-expert-gate", "moe_shared_expert_gate"),
                 ("--moe-router-pre-softmax", "moe_router_pre_softmax"))


def _moe_flags(args: argparse.Namespace) -> list[str]:
    if not _on(getattr(args, "num_experts", None)):
        return []
    flags = [str(x) for flag, name in _MOE_VALUED if getattr(args, name, None) is not None
             for x in (flag, getattr(args, name))]
    return flags + [flag for flag, name in _MOE_SWITCHES if getattr(args, name, False)]

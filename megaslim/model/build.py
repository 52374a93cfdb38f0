"""Build megatron-core's GPTModel (this rank's TP/PP shard) from a `ModelArch` and the model config."""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from megaslim.config import ModelConfig
from megaslim.errors import MegaslimError
from megaslim.model.arch import ModelArch, check_parallel_layout, check_rope_scaling
from megaslim.model.compat import define_moe_te_names, mark_tensor_parallel_params
from megaslim.runtime.layout import sequence_parallel_applies

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.pow(F.relu(x), 2)


def _activation(name: str):
    """megatron's squared_relu is wrapped in torch.compile (jit_fuser): on GPU that fuses it; on CPU it would
    cost seconds per process and need a C++ toolchain, so the same formula runs eagerly there."""
    from megatron.core.activations import squared_relu

    funcs = {"silu": F.silu, "relu2": squared_relu if torch.cuda.is_available() else _squared_relu}
    if name not in funcs:
        raise MegaslimError(f"unsupported MLP activation {name!r}; supported: {sorted(funcs)}")
    return funcs[name]


class LayerNorm1P(torch.nn.LayerNorm):
    """LayerNorm with bias whose scale is stored zero-centred (w) and applied as 1 + w: Nemotron's
    LayerNorm1P, megatron's `layernorm_zero_centered_gamma`. For the local spec, whose torch norm wrapper
    refuses zero-centred gamma (apex's fused norm, the only local one that supports it, needs CUDA)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        torch.nn.init.zeros_(self.weight)  # 1 + 0: the identity scale, like megatron's own init
        _mark_sequence_parallel(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class RMSNormSP(torch.nn.RMSNorm):
    """torch's RMSNorm for the local spec under sequence parallelism, which megatron's torch norm wrapper
    (WrappedTorchNorm, the local spec's norm without apex) refuses: the same module and weights, marked
    like megatron's FusedLayerNorm marks its own."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(normalized_shape=hidden_size, eps=eps)  # as WrappedTorchNorm builds it
        _mark_sequence_parallel(self, config)


def _mark_sequence_parallel(norm: torch.nn.Module, config) -> None:
    """Under sequence parallelism each TP rank normalises its own tokens, so a norm's gradient is a partial
    sum: megatron's finalize_model_grads all-reduces it over TP for parameters marked `sequence_parallel`."""
    for p in norm.parameters():
        p.sequence_parallel = config.sequence_parallel


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def moe_config(arch: ModelArch, ep: int = 1) -> dict:
    """TransformerConfig MoE settings: dropless routing, SequentialMLP experts (no grouped GEMM) and the
    allgather dispatcher, which run on CPU too (alltoall builds a CUDA stream), in the HF families' order."""
    if not arch.is_moe:
        return {}
    shared = arch.moe_shared_expert_intermediate_size
    return dict(
        num_moe_experts=arch.num_moe_experts,
        moe_router_topk=arch.moe_router_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=shared or None,
        moe_shared_expert_gate=bool(shared) and arch.moe_shared_expert_gate,
        moe_router_score_function=arch.moe_router_score_function,
        moe_router_pre_softmax=arch.moe_router_pre_softmax,
        moe_router_load_balancing_type="aux_loss" if arch.moe_aux_loss_coeff else "none",
        moe_aux_loss_coeff=arch.moe_aux_loss_coeff,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        expert_model_parallel_size=ep,
    )


def transformer_config(arch: ModelArch, model_cfg: ModelConfig, *, tp: int, pp: int,
                       init_weights: bool = True, ep: int = 1, sequence_parallel: bool = False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = _DTYPES[model_cfg.params_dtype]
    on_gpu = torch.cuda.is_available()
    if arch.normalization not in ("RMSNorm", "LayerNorm1P"):
        raise MegaslimError(f"unsupported normalization {arch.normalization!r} (RMSNorm | LayerNorm1P)")
    layer_norm_1p = arch.normalization == "LayerNorm1P"
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization="LayerNorm" if layer_norm_1p else "RMSNorm",
        layernorm_zero_centered_gamma=layer_norm_1p,
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=arch.gated,
        activation_func=_activation(arch.activation),
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel_applies(sequence_parallel, tp),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        perform_initialization=init_weights,
        use_cpu_initialization=not on_gpu,
        # The fused kernels below need CUDA (apex/TE); off keeps CPU and GPU numerics alike.
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        init_method_std=0.02,
        **moe_config(arch, ep),
    )


def layer_spec(impl: str, config, arch: ModelArch, core_attention: str = "local"):
    """The layer (or block) spec of `model.transformer_impl`. With the local spec, `core_attention`
    `sdpa` swaps megatron's DotProductAttention for torch's SDPA; TE specs keep TE's own kernels."""
    from megatron.core.models.gpt import gpt_layer_specs

    if impl == "local":
        from megaslim.model.rope import install as install_rope

        install_rope()  # megatron's unfused RoPE as one op, bit-equal (model/rope.py); TE specs keep theirs
        if arch.normalization == "LayerNorm1P":
            spec = _local_block(config, arch, LayerNorm1P, "LayerNorm")
        elif config.sequence_parallel:
            spec = _local_block(config, arch, RMSNormSP, "RMSNorm")
        else:
            spec = gpt_layer_specs.get_gpt_layer_local_spec(
                num_experts=arch.num_moe_experts, moe_grouped_gemm=False, normalization="RMSNorm",
                qk_layernorm=arch.qk_layernorm)
        if core_attention == "sdpa":
            from megaslim.model.sdpa_attention import with_sdpa

            spec = with_sdpa(spec)
        return spec
    try:
        import transformer_engine  # noqa: F401
    except Exception as err:  # ImportError, or a CUDA/cuDNN load failure
        raise MegaslimError(
            f"model.transformer_impl={impl} needs Transformer Engine, which does not import here "
            f"({type(err).__name__}: {err}). Install megaslim[te] on a CUDA machine, or set "
            "model.transformer_impl=local"
        ) from None
    if impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=arch.num_moe_experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_layernorm
        )
    from megatron.core.post_training.modelopt.gpt.model_specs import get_gpt_modelopt_spec

    return get_gpt_modelopt_spec(config, remap_te_layernorm=True)


def _local_block(config, arch: ModelArch, norm, normalization: str):
    """The local layer spec with every norm (the final one too) `norm` (LayerNorm1P, or RMSNormSP under
    sequence parallelism): a block spec, since a layer spec would give the final norm megatron's default
    implementation."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=arch.num_moe_experts, moe_grouped_gemm=False,
                                                    normalization=normalization, qk_layernorm=arch.qk_layernorm)
    sub = replace(spec.submodules, input_layernorm=norm, pre_mlp_layernorm=norm)
    if arch.qk_layernorm:
        attn = spec.submodules.self_attention
        sub.self_attention = replace(attn, submodules=replace(attn.submodules, q_layernorm=norm, k_layernorm=norm))
    spec = replace(spec, submodules=sub)
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=norm)


def _check_moe_build(arch: ModelArch) -> None:
    """An MoE model: its experts split over TP like the dense layers (megaslim's layout table assumes it)."""
    from megatron.core import parallel_state as ps

    if arch.normalization != "RMSNorm":
        raise MegaslimError(f"mixture-of-experts layers with {arch.normalization} are not supported (RMSNorm only)")
    etp = ps.get_expert_tensor_parallel_world_size()
    if etp != ps.get_tensor_model_parallel_world_size():
        raise MegaslimError(f"expert tensor parallel size {etp} must equal the tensor parallel size")
    define_moe_te_names()  # the router needs it without Transformer Engine


def build_gpt(arch: ModelArch, model_cfg: ModelConfig, *, init_weights: bool = False,
              sequence_parallel: bool = False):
    """This rank's GPTModel shard. With init_weights=False the weights are left for a loader to fill.
    `sequence_parallel` (at TP>1; ParallelLayout.sequence_parallel): megatron's sequence parallelism, for
    training; the parameters and checkpoint keys are the same either way."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    check_parallel_layout(arch, tp, pp, ep)
    if arch.is_moe:
        _check_moe_build(arch)
    config = transformer_config(arch, model_cfg, tp=tp, pp=pp, init_weights=init_weights, ep=ep,
                                sequence_parallel=sequence_parallel)
    check_rope_scaling(arch.rope_scaling)  # None, or llama3 with megatron's fixed parameters
    rope_scaling = bool(arch.rope_scaling)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model_cfg.transformer_impl, config, arch, model_cfg.core_attention),
        vocab_size=padded_vocab_size(arch.vocab_size, model_cfg.make_vocab_size_divisible_by, tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rotary_base),
        rotary_percent=arch.rotary_percent,
        rope_scaling=rope_scaling,
        rope_scaling_factor=(arch.rope_scaling or {}).get("factor", 8.0),
    )
    mark_tensor_parallel_params(model)  # before DDP/optimizer copy the attributes (grad norm, clipping)
    model.arch = arch  # the unpadded description travels with the module
    if torch.cuda.is_available():
        model.cuda()
    return model

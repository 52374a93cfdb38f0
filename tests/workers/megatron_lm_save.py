"""Worker: save an HF model the way Megatron-LM's `save_checkpoint` does (--ckpt-format torch_dist), without
Megatron-LM's training loop: common.pt holds `args` (an argparse.Namespace with Megatron-LM's names, enums
and dtypes), checkpoint_version 3.0, iteration, scheduler state; the sharded part holds the GPTModel's
`model` keys, an RNG ShardedObject and a stand-in optimizer tensor; rank 0 then writes the tracker.
Read from megatron/training/checkpointing.py (generate_state_dict, save_checkpoint) of megatron-core 0.17.1.

usage: megatron_lm_save.py HF_SOURCE ROOT TP PP ITERATION [DTYPE [EP]]  (DTYPE: float32 | bfloat16; Megatron-LM's
--bf16 saves bf16 weights; EP: expert parallel size of an MoE source)
"""
import argparse
import signal
import sys
from pathlib import Path

import torch

from megaslim.config import ModelConfig
from megaslim.runtime import init_runtime, main_guard


def moe_args(arch, ep):
    """What --num-experts N --moe-router-topk K --moe-ffn-hidden-size F ... --moe-grouped-gemm saves (none: dense)."""
    if not arch.num_moe_experts:
        return dict(num_experts=None)
    return dict(
        num_experts=arch.num_moe_experts, moe_router_topk=arch.moe_router_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=arch.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=arch.moe_shared_expert_gate, moe_router_pre_softmax=arch.moe_router_pre_softmax,
        moe_router_score_function="softmax", moe_aux_loss_coeff=[0.01], moe_z_loss_coeff=None, moe_layer_freq=1,
        moe_router_load_balancing_type="aux_loss", moe_grouped_gemm=True, moe_token_dispatcher_type="alltoall",
        moe_expert_capacity_factor=None, moe_router_num_groups=None, moe_router_group_topk=None,
        moe_router_topk_scaling_factor=None, moe_router_enable_expert_bias=False, moe_input_jitter_eps=None,
        moe_router_dtype="fp32", expert_model_parallel_size=ep,
    )


def megatron_lm_args(arch, *, tp, pp, world, padded, tokenizer_model, dtype, ep=1):
    """What pretrain_gpt.py --num-layers ... --swiglu --normalization RMSNorm ... saves as args."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, group_query_attention=True,
        num_query_groups=arch.num_query_groups, kv_channels=arch.kv_channels,
        max_position_embeddings=arch.max_position_embeddings, seq_length=128,
        position_embedding_type="rope", use_rotary_position_embeddings=False, rotary_base=int(arch.rotary_base),
        rotary_percent=1.0, rotary_interleaved=False, rotary_seq_len_interpolation_factor=None,
        use_rope_scaling=False, rope_scaling_factor=8.0, normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon, apply_layernorm_1p=False, swiglu=True, squared_relu=False,
        add_bias_linear=False, add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_layernorm,
        untie_embeddings_and_output_weights=not arch.tie_word_embeddings, make_vocab_size_divisible_by=128,
        padded_vocab_size=padded, vocab_size=None, tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=tokenizer_model, multi_latent_attention=False, mtp_num_layers=None,
        hybrid_layer_pattern=None, heterogeneous_layers_config_path=None, spec=None, window_size=None,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, world_size=world,
        data_parallel_size=world // (tp * pp), params_dtype=getattr(torch, dtype), bf16=dtype == "bfloat16",
        fp16=False,
        attention_backend=AttnBackend.auto, model_type=ModelType.encoder_or_decoder,
        exit_signal=signal.SIGTERM, ckpt_format="torch_dist", transformer_impl="transformer_engine",
        train_iters=1000, lr=3e-4, data_path=["/data/corpus_text_document"], consumed_train_samples=6400,
        **moe_args(arch, ep),
    )


def main():
    src, root, tp, pp, it = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    dtype = sys.argv[6] if len(sys.argv) > 6 else "float32"
    ep = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    rt = init_runtime(tp=tp, pp=pp, ep=ep)
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from megaslim.sources import load_model

    model, arch, source = load_model(ModelConfig(load=src, params_dtype=dtype))
    padded = model.embedding.word_embeddings.weight.shape[0] * tp if ps.is_pipeline_first_stage() else None
    padded = [padded]
    dist.broadcast_object_list(padded, src=0)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    state = {
        "args": megatron_lm_args(arch, tp=tp, pp=pp, world=rt.world_size, padded=padded[0], tokenizer_model=src,
                                 dtype=dtype, ep=ep),
        "checkpoint_version": 3.0,
        "iteration": it,
        "model": model.sharded_state_dict(),
        "optimizer": {"param_groups": [{"lr": 3e-4, "weight_decay": 0.1, "params": [0, 1]}],
                      "state": {"exp_avg": ShardedTensor.from_rank_offsets(
                          "optimizer.state.exp_avg.dummy", torch.full((4,), float(rt.rank)),
                          (0, rt.rank, rt.world_size))}},
        "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": it * 64, "decay_style": "cosine"},
        "rng_state": ShardedObject("rng_state", [{"torch_rng_state": torch.get_rng_state()}], (pp, tp),
                                   (pp_rank, tp_rank), replica_id=ps.get_data_parallel_rank()),
        "num_floating_point_operations_so_far": 1.5e12,
    }
    name = root / f"iter_{it:07d}"
    if rt.rank == 0:
        name.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, str(name), content_metadata={
        "singleton_local_shards": False, "chained_optim_avoid_prefix": True,
        "distrib_optim_sharding_type": "dp_reshardable"})
    dist.barrier()
    if rt.rank == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(str(it))


if __name__ == "__main__":
    main_guard(main)

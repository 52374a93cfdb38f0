"""Megatron-LM (pretrain_gpt.py) torch_dist checkpoints in and out: its `args` mapped to a ModelArch,
common.pt read with an exact allow-list, weights resharded by megatron's dist_checkpointing."""
from megaslim.megatron_lm.args import arch_from_args, args_from_arch
from megaslim.megatron_lm.read import (
    TRACKER,
    MegatronLMCheckpoint,
    arch_of,
    load_into,
    looks_like,
    model_config_for,
    open_checkpoint,
    tokenizer_dir,
)
from megaslim.megatron_lm.unpickle import read_common
from megaslim.megatron_lm.write import check_export_dir, export_megatron_lm

__all__ = ["TRACKER", "MegatronLMCheckpoint", "arch_from_args", "arch_of", "args_from_arch", "check_export_dir",
           "export_megatron_lm", "load_into", "looks_like", "model_config_for", "open_checkpoint", "read_common",
           "tokenizer_dir"]

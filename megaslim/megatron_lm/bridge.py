"""Megatron-Bridge checkpoints: Megatron-LM's torch_dist layout (same files, same GPTModel keys) whose
architecture lives in `iter_NNNNNNN/run_config.yaml` (TransformerConfig names) instead of common.pt args.
Translated here into Megatron-LM args names, so `args.py` stays the one table to ModelArch."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import yaml

from megaslim.errors import MegaslimError

RUN_CONFIG = "run_config.yaml"
TRAIN_STATE_TRACKER = "latest_train_state.pt"  # Bridge's own tracker (it writes Megatron-LM's beside it)
# run_config.yaml `model:` name -> Megatron-LM args name, where they differ
_RENAMES = {
    "num_moe_experts": "num_experts",
    "layernorm_zero_centered_gamma": "apply_layernorm_1p",
    "rope_scaling": "use_rope_scaling",
    "seq_len_interpolation_factor": "rotary_seq_len_interpolation_factor",
}
_SILU = "torch.nn.functional.silu"
_SQUARED_RELU = "megatron.core.activations.squared_relu"


def read_run_config(path: Path) -> dict:
    """run_config.yaml as plain data (yaml.safe_load: Bridge writes callables and enums as `_target_` dicts)."""
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise MegaslimError(f"{path}: unreadable ({str(err).splitlines()[0][:160]})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise MegaslimError(f"{path}: no `model:` section; not a Megatron-Bridge run config")
    return cfg


def _target(value: Any) -> Any:
    return value.get("_target_") if isinstance(value, dict) else value


def args_from_run_config(cfg: dict) -> argparse.Namespace:
    """The Megatron-LM args a GPT run of Bridge's `model:` (a GPTModelProvider) corresponds to."""
    m = {k: v for k, v in cfg["model"].items() if not k.startswith("_")}
    a = {_RENAMES.get(k, k): v for k, v in m.items()}
    gated, act = bool(m.get("gated_linear_unit")), _target(m.get("activation_func"))
    a["swiglu"] = gated and act == _SILU
    a["squared_relu"] = not gated and act == _SQUARED_RELU  # neither (GeLU, ...): args.py refuses it
    heads, groups = m.get("num_attention_heads"), m.get("num_query_groups")
    a["group_query_attention"] = groups is not None and groups != heads
    a["untie_embeddings_and_output_weights"] = not m.get("share_embeddings_and_output_weights", True)
    a["padded_vocab_size"] = _padded_vocab(m)
    a.setdefault("max_position_embeddings", m.get("seq_length"))
    a["mtp_num_layers"] = m.get("mtp_num_layers") or (1 if m.get("mtp_enabled") else None)
    tok = cfg.get("tokenizer") or {}
    a["tokenizer_type"], a["tokenizer_model"] = tok.get("tokenizer_type"), tok.get("tokenizer_model")
    return argparse.Namespace(**a)


def _padded_vocab(m: dict) -> Any:
    """GPTModelProvider.provide: vocab_size padded to make_vocab_size_divisible_by x TP when should_pad_vocab."""
    vocab = m.get("vocab_size")
    if not isinstance(vocab, int) or not m.get("should_pad_vocab"):
        return vocab
    multiple = int(m.get("make_vocab_size_divisible_by", 128)) * int(m.get("tensor_model_parallel_size", 1))
    return int(math.ceil(vocab / multiple) * multiple)

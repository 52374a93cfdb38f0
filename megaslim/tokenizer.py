"""Tokenizer for a model source (HF tokenizers; `trust_remote_code` only when the user sets it)."""
from __future__ import annotations

from megaslim.config import ModelConfig
from megaslim.errors import MegaslimError


def load_tokenizer(model_cfg: ModelConfig, source):
    from transformers import AutoTokenizer

    path = model_cfg.tokenizer or source.tokenizer_dir
    if path is None:
        raise MegaslimError(f"{source.label} carries no tokenizer; set model.tokenizer to an HF tokenizer dir")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise MegaslimError(f"cannot load a tokenizer from {path}: {err}") from None

"""Tokenizer for a model source (HF tokenizers; `trust_remote_code` only when the user sets it)."""
from __future__ import annotations

from pathlib import Path

from megaslim.config import ModelConfig
from megaslim.errors import MegaslimError


def load_tokenizer(model_cfg: ModelConfig, source):
    from transformers import AutoTokenizer

    path = model_cfg.tokenizer or source.tokenizer_dir
    if path is None:
        raise MegaslimError(f"{source.label} carries no tokenizer; set model.tokenizer to an HF tokenizer dir")
    where = f"model.tokenizer={path}" if model_cfg.tokenizer else f"the tokenizer of {source.label} ({path})"
    if not Path(path).is_dir():  # never let transformers read a missing path as a Hub repo id
        raise MegaslimError(f"{where}: no such directory; set model.tokenizer to an HF tokenizer directory")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise MegaslimError(f"{where} needs its own Python code to load; if you trust it, set "
                                "model.trust_remote_code=true") from None
        raise MegaslimError(f"cannot load a tokenizer from {where}: {str(err).splitlines()[0]}") from None

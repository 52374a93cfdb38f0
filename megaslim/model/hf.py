"""Hugging Face bridge for Llama-family decoders (llama, mistral, qwen2, qwen3), Nemotron, and the
mixtures of experts Mixtral, Qwen3-MoE and Qwen2-MoE.

The name/layout rules are the table `_LAYER_MAP` (MoE layers: `_MOE_NAMES`, `_moe_layer_names`); what each
family adds (QKV bias, QK layernorm, a non-gated squared-ReLU MLP, LayerNorm1P, experts) is the table
`_FAMILIES`; TP sharding is in
`megaslim.model.layout`. Weights are read with safetensors (or `torch.load(weights_only=True)`), never
unpickled. Configs with features megaslim would not reproduce are refused by name (`check_hf_config`).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megaslim import io as mio
from megaslim.errors import MegaslimError
from megaslim.model.arch import ModelArch, check_rope_scaling
from megaslim.model.expert_parallel import gather_experts, global_fetch
from megaslim.model.state import gather_full_state

# HF model_type -> the ModelArch fields it implies (everything else comes from the config's sizes).
_LLAMA_LIKE = dict(qkv_bias=False, qk_layernorm=False, gated=True, activation="silu", normalization="RMSNorm")
_FAMILIES: dict[str, dict] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": dict(_LLAMA_LIKE, qkv_bias=True),  # q/k/v biases always on, o_proj without
    "qwen3": dict(_LLAMA_LIKE, qk_layernorm=True),  # per-head RMSNorm on q and k
    # Nemotron(-4)/Minitron: up_proj -> squared ReLU -> down_proj; LayerNorm1P (bias; scale applied as 1 + w)
    "nemotron": dict(qkv_bias=False, qk_layernorm=False, gated=False, activation="relu2",
                     normalization="LayerNorm1P"),
    # mixtures of experts: every layer's MLP is routed experts (names in `_MOE_NAMES`)
    "mixtral": _LLAMA_LIKE,
    "qwen3_moe": dict(_LLAMA_LIKE, qk_layernorm=True),
    "qwen2_moe": dict(_LLAMA_LIKE, qkv_bias=True),  # plus a shared expert with a sigmoid gate
}
SUPPORTED_FAMILIES = tuple(_FAMILIES)
# MoE family -> (HF module of the MoE block, expert [gate, up] names, expert down name)
_MOE_NAMES: dict[str, tuple[str, tuple[str, str], str]] = {
    "mixtral": ("block_sparse_moe", ("w1", "w3"), "w2"),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj"), "down_proj"),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj"), "down_proj"),
}
_SHARED_EXPERT = {  # megatron suffix -> Qwen2-MoE's shared expert names
    "mlp.shared_experts.linear_fc1.weight": ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"),
    "mlp.shared_experts.linear_fc2.weight": ("mlp.shared_expert.down_proj.weight",),
    "mlp.shared_experts.gate_weight": ("mlp.shared_expert_gate.weight",),
}
_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")
_ACT = {"silu": "silu", "relu2": "relu2"}  # ModelArch.activation -> HF hidden_act
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
EXPORT_MARKER = "megaslim_export.json"

# megatron per-layer suffix -> HF per-layer names; several names are combined (see `_combine`).
_LAYER_MAP: dict[str, tuple[str, ...]] = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "input_layernorm.bias": ("input_layernorm.bias",),  # LayerNorm1P
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),  # TE fused norm
    "self_attention.linear_qkv.layer_norm_bias": ("input_layernorm.bias",),
    "self_attention.linear_qkv.weight": (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attention.linear_qkv.bias": (
        "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "pre_mlp_layernorm.bias": ("post_attention_layernorm.bias",),
    "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight",),  # TE fused norm
    "mlp.linear_fc1.layer_norm_bias": ("post_attention_layernorm.bias",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),  # gated: [gate; up]
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}
_NON_GATED: dict[str, tuple[str, ...]] = {  # overrides for a non-gated MLP (Nemotron): fc1 rows = neurons
    "mlp.linear_fc1.weight": ("mlp.up_proj.weight",),
}
_GLOBAL_MAP: dict[str, tuple[str, ...]] = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight",),
    "decoder.final_layernorm.weight": ("model.norm.weight",),
    "decoder.final_layernorm.bias": ("model.norm.bias",),
    "output_layer.weight": ("lm_head.weight",),
}
# TE's fused norm+linear names -> the separate norm they duplicate when both are present
_FUSED_NORM = {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
               "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def hf_names(name: str, arch: ModelArch) -> tuple[str, ...]:
    """HF tensor names that make up the megatron tensor `name` (global layer numbering)."""
    m = _LAYER_RE.match(name)
    if m:
        i, suffix = int(m.group(1)), m.group(2)
        table = _LAYER_MAP if arch.gated else {**_LAYER_MAP, **_NON_GATED}
        names = _moe_layer_names(suffix, arch) if arch.is_moe and suffix.startswith("mlp.") else table.get(suffix)
        if names is None:
            raise KeyError(f"no HF mapping for megatron parameter {name!r}")
        return tuple(f"model.layers.{i}.{n}" for n in names)
    if name == "output_layer.weight" and arch.tie_word_embeddings:
        return _GLOBAL_MAP["embedding.word_embeddings.weight"]  # last PP stage's tied copy
    if name not in _GLOBAL_MAP:
        raise KeyError(f"no HF mapping for megatron parameter {name!r}")
    return _GLOBAL_MAP[name]


def _moe_layer_names(suffix: str, arch: ModelArch) -> Optional[tuple[str, ...]]:
    """HF names (within a layer) of an MoE layer's megatron parameter `suffix` (global expert number)."""
    block, gate_up, down = _MOE_NAMES[arch.family]
    if suffix == "mlp.router.weight":
        return (f"{block}.gate.weight",)
    m = _EXPERT_RE.match(suffix)
    if m:
        e = m.group(1)
        parts = gate_up if m.group(2) == "1" else (down,)
        return tuple(f"{block}.experts.{e}.{n}.weight" for n in parts)
    return _SHARED_EXPERT.get(suffix)


def moe_hf_shapes(arch: ModelArch) -> dict[str, list[int]]:
    """Shapes config.json implies for an MoE layer's HF tensors (expert number written N); {} if dense."""
    if not arch.is_moe:
        return {}
    (block, (gate, up), down), h, f = _MOE_NAMES[arch.family], arch.hidden_size, arch.moe_ffn_hidden_size
    out = {f"{block}.gate.weight": [arch.num_moe_experts, h], f"{block}.experts.N.{down}.weight": [h, f],
           f"{block}.experts.N.{gate}.weight": [f, h], f"{block}.experts.N.{up}.weight": [f, h]}
    if arch.moe_shared_expert_intermediate_size:
        out["mlp.shared_expert.down_proj.weight"] = [h, arch.moe_shared_expert_intermediate_size]
    return out


def _is_qkv(name: str) -> bool:
    return ".linear_qkv.weight" in name or ".linear_qkv.bias" in name


def _combine(name: str, parts: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """HF tensors -> full megatron tensor. QKV rows are grouped per query group: [q_1..q_n, k, v]."""
    if _is_qkv(name):
        q, k, v = parts
        g, hd, n = arch.num_query_groups, arch.kv_channels, arch.heads_per_group
        rest = q.shape[1:]
        q = q.reshape(g, n * hd, *rest)
        k = k.reshape(g, hd, *rest)
        v = v.reshape(g, hd, *rest)
        return torch.cat([q, k, v], 1).reshape(g * (n + 2) * hd, *rest)
    if len(parts) == 2:  # gated fc1: [gate; up]
        return torch.cat(parts, 0)
    return parts[0]


def _split(name: str, full: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    """Inverse of `_combine`."""
    if _is_qkv(name):
        g, hd, n = arch.num_query_groups, arch.kv_channels, arch.heads_per_group
        rest = full.shape[1:]
        grouped = full.reshape(g, (n + 2) * hd, *rest)
        q, k, v = grouped.split([n * hd, hd, hd], 1)
        return [q.reshape(g * n * hd, *rest), k.reshape(g * hd, *rest), v.reshape(g * hd, *rest)]
    if ".linear_fc1.weight" in name and arch.gated:
        return list(full.chunk(2, 0))
    return [full]


# ----------------------------------------------------------------------------------------------
# Reading an HF directory


def read_hf_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MegaslimError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise MegaslimError(f"{cfg_file}: not valid JSON ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(cfg, dict):
        raise MegaslimError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def refused_unpickle(path: Path, err: Exception) -> MegaslimError:
    """torch.load(weights_only=True) refused `path`: say what, without torch's advice to lift the guard."""
    text = str(err)
    found = [line.strip() for line in text.splitlines() if "Unsupported" in line or "GLOBAL" in line]
    what = found[0] if found else (text.splitlines()[0][:160] if text else type(err).__name__)
    return MegaslimError(f"{path}: refused to unpickle ({what}); megaslim reads only plain tensors from pickles. "
                         "Use a safetensors copy of the weights from a source you trust")


def _sliding_window(cfg: dict) -> Optional[int]:
    """The attention window some layer actually uses, or None."""
    window = cfg.get("sliding_window")
    if not window:
        return None
    types = cfg.get("layer_types")
    if types is not None:  # transformers >= 4.54 writes the per-layer attention kind
        used = "sliding_attention" in types
    elif "use_sliding_window" in cfg:  # qwen2/qwen3: layers >= max_window_layers slide, if switched on
        used = bool(cfg["use_sliding_window"]) and cfg.get("max_window_layers", 0) < cfg["num_hidden_layers"]
    else:  # mistral: a window in the config applies to every layer
        used = True
    return int(window) if used else None


def _rope(cfg: dict) -> tuple[float, Optional[dict], float]:
    """(rope_theta, scaling or None, partial_rotary_factor) from a transformers 4 or 5 config."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    partial = rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = {}
    return float(theta), (rope or None), float(partial if partial is not None else 1.0)


def check_hf_config(cfg: dict) -> None:
    """Refuse, naming the feature, any HF config megaslim would not convert faithfully."""
    family = cfg.get("model_type")
    moe = {k: cfg[k] for k in _MOE_KEYS if cfg.get(k)}
    if moe and family not in _MOE_NAMES:
        raise MegaslimError(
            f"mixture-of-experts models are not supported for {family} ({moe}); megaslim converts dense "
            f"decoders and the mixtures of experts {', '.join(_MOE_NAMES)}")
    if family in _MOE_NAMES:
        check_moe_routing(cfg)
    if family not in _FAMILIES:
        raise MegaslimError(
            f"unsupported architecture model_type={family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    act = _ACT[_FAMILIES[family]["activation"]]
    if cfg.get("hidden_act", act) != act:
        raise MegaslimError(f"unsupported hidden_act={cfg['hidden_act']!r} for {family} (expected {act!r})")
    for key, what in (("attention_bias", "attention biases (bias on q/k/v and o_proj)"),
                      ("mlp_bias", "MLP biases")):
        if cfg.get(key):
            raise MegaslimError(f"{family} with {key}=true ({what}) is not supported")
    kinds = set(cfg.get("layer_types") or ()) - {"full_attention", "sliding_attention"}
    if kinds:
        raise MegaslimError(f"attention layer_types {sorted(kinds)} are not supported")
    window, max_pos = _sliding_window(cfg), cfg.get("max_position_embeddings", 2048)
    if window is not None and window < max_pos:
        raise MegaslimError(
            f"sliding-window attention (sliding_window={window} < max_position_embeddings={max_pos}) is not "
            "supported: megatron would attend over the whole context. Use a model without a window, or set "
            "sliding_window to null in config.json if you only use sequences up to the window")
    _, scaling, partial = _rope(cfg)
    check_rope_scaling(scaling)
    if partial != 1.0 and family != "nemotron":
        raise MegaslimError(
            f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported for {family}")
    if cfg.get("rope_interleave") or cfg.get("rotary_interleaved"):
        raise MegaslimError("interleaved rotary embeddings are not supported")


# HF config keys of routing megatron's router would not reproduce here -> (value(s) that are harmless, what it is)
_ROUTING_REFUSED = {
    "n_group": ((None, 0, 1), "grouped top-k routing (experts chosen within the best groups)"),
    "topk_group": ((None, 0, 1), "grouped top-k routing"),
    "topk_method": ((None, "greedy"), "a top-k method other than greedy"),
    "scoring_func": ((None, "softmax"), "a router score function other than softmax"),
    "routed_scaling_factor": ((None, 1, 1.0), "scaled routing weights"),
    "router_jitter_noise": ((None, 0, 0.0), "router jitter noise (HF jitters the experts' input too)"),
    "decoder_sparse_step": ((None, 1), "dense layers between MoE layers"),
    "mlp_only_layers": ((None, []), "dense (MLP-only) layers among MoE layers"),
    "first_k_dense_replace": ((None, 0), "dense first layers"),
    "n_shared_experts": ((None, 0), "shared experts of this kind"),
    "num_shared_experts": ((None, 0), "shared experts of this kind"),
}


def check_moe_routing(cfg: dict) -> None:
    """Refuse, by name, MoE settings megaslim's megatron router and layers would not reproduce."""
    family = cfg.get("model_type")
    for key, (harmless, what) in _ROUTING_REFUSED.items():
        if key in cfg and cfg[key] not in harmless:
            raise MegaslimError(f"{family} with {key}={cfg[key]!r} ({what}) is not supported")
    experts, topk = cfg.get("num_local_experts") or cfg.get("num_experts"), cfg.get("num_experts_per_tok")
    if not experts or not topk or not 1 <= topk <= experts:
        raise MegaslimError(f"{family}: num_experts_per_tok={topk} must be between 1 and the {experts} experts")
    if family == "qwen2_moe" and not cfg.get("shared_expert_intermediate_size"):
        raise MegaslimError("qwen2_moe without a shared expert (shared_expert_intermediate_size=0) is not supported")
    if family == "qwen2_moe" and not cfg.get("qkv_bias", True):
        raise MegaslimError("qwen2_moe with qkv_bias=false is not supported")


def _moe_fields(cfg: dict) -> dict:
    """The ModelArch MoE fields of a checked MoE config (empty for a dense family)."""
    family = cfg["model_type"]
    if family not in _MOE_NAMES:
        return {}
    mixtral = family == "mixtral"  # Mixtral always renormalises the top-k weights; Qwen: norm_topk_prob
    fields = dict(
        num_moe_experts=cfg.get("num_local_experts") or cfg["num_experts"],
        moe_router_topk=cfg["num_experts_per_tok"],
        moe_ffn_hidden_size=cfg["intermediate_size"] if mixtral else cfg["moe_intermediate_size"],
        moe_router_pre_softmax=not mixtral and not cfg.get("norm_topk_prob", False),
        moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef") or 0.0),
    )
    if family == "qwen2_moe":
        fields.update(moe_shared_expert_intermediate_size=cfg["shared_expert_intermediate_size"],
                      moe_shared_expert_gate=True)
    return fields


def arch_from_hf_config(cfg: dict) -> ModelArch:
    check_hf_config(cfg)
    try:
        return _arch_from_checked(cfg)
    except (KeyError, TypeError, ZeroDivisionError) as err:
        raise MegaslimError(f"config.json of model_type={cfg.get('model_type')!r} lacks or mistypes {err}") from None


def _arch_from_checked(cfg: dict) -> ModelArch:
    family = cfg["model_type"]
    heads = cfg["num_attention_heads"]
    theta, scaling, partial = _rope(cfg)
    eos = cfg.get("eos_token_id")
    return ModelArch(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rotary_base=theta,
        norm_epsilon=cfg.get("norm_eps" if family == "nemotron" else "rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        family=family,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        rope_scaling=scaling,
        rotary_percent=partial,
        **_FAMILIES[family],
        **_moe_fields(cfg),
    )


class HFReader:
    """Lazy tensor access to an HF checkpoint directory: each rank reads only what it needs."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._handles: dict[str, object] = {}
        self._where: dict[str, str] = {}
        self._state: dict[str, torch.Tensor] | None = None
        index = self.path / "model.safetensors.index.json"
        files = sorted(self.path.glob("*.safetensors"))
        if index.is_file():
            self._where = json.loads(index.read_text())["weight_map"]
        elif files:
            for f in files:
                with safe_open(str(f), "pt") as h:
                    for k in h.keys():
                        self._where[k] = f.name
        elif (self.path / "pytorch_model.bin").is_file():
            try:
                self._state = torch.load(self.path / "pytorch_model.bin", map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise refused_unpickle(self.path / "pytorch_model.bin", err) from None
        else:
            raise MegaslimError(f"{self.path} holds no *.safetensors or pytorch_model.bin weights")
        self._safe_open = safe_open

    def keys(self) -> set[str]:
        return set(self._state) if self._state is not None else set(self._where)

    def get(self, name: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[name]
        if name not in self._where:
            raise KeyError(name)
        fname = self._where[name]
        if fname not in self._handles:
            self._handles[fname] = self._safe_open(str(self.path / fname), "pt")
        return self._handles[fname].get_tensor(name)


def _check_tie(reader: HFReader, arch: ModelArch) -> None:
    """The config's tie_word_embeddings must agree with the weights: never use one matrix for both when
    the checkpoint holds two different ones, nor invent an output layer."""
    has_head = "lm_head.weight" in reader.keys()
    if not arch.tie_word_embeddings and not has_head:
        raise MegaslimError(
            f"{reader.path}: config.json says tie_word_embeddings=false but the weights hold no lm_head.weight")
    if arch.tie_word_embeddings and has_head and not torch.equal(
            reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
        raise MegaslimError(
            f"{reader.path}: config.json says tie_word_embeddings=true but lm_head.weight differs from "
            "model.embed_tokens.weight (set tie_word_embeddings=false if the model is untied)")


def hf_fetcher(reader: HFReader, arch: ModelArch) -> Callable[[str], torch.Tensor]:
    checked = []

    def fetch(name: str) -> torch.Tensor:
        if name in ("embedding.word_embeddings.weight", "output_layer.weight") and not checked:
            _check_tie(reader, arch)
            checked.append(True)
        names = hf_names(name, arch)
        missing = [n for n in names if n not in reader.keys()]
        if missing:
            raise MegaslimError(f"{reader.path}: weights {missing} not found (needed for {name})")
        return _combine(name, [reader.get(n).float() for n in names], arch)

    return global_fetch(fetch, arch.num_moe_experts)  # load_full_state asks by local expert number


# ----------------------------------------------------------------------------------------------
# Writing an HF directory


def _check_exportable(arch: ModelArch) -> None:
    """The arch must be what its HF family can express (else the export would load as another model)."""
    if arch.family not in _FAMILIES:
        raise MegaslimError(f"cannot export model family {arch.family!r} to HF; supported: {SUPPORTED_FAMILIES}")
    off = {k: getattr(arch, k) for k, v in _FAMILIES[arch.family].items() if getattr(arch, k) != v}
    if arch.rotary_percent != 1.0 and arch.family != "nemotron":
        off["rotary_percent"] = arch.rotary_percent
    off.update(_moe_export_problems(arch))
    if off:
        raise MegaslimError(f"cannot export as HF {arch.family}: {off} differs from what {arch.family} models have")
    check_rope_scaling(arch.rope_scaling)


def _moe_export_problems(arch: ModelArch) -> dict:
    """MoE settings the arch's HF family cannot express (a dense family has no experts)."""
    moe_family = arch.family in _MOE_NAMES
    if arch.is_moe != moe_family:
        return {"num_moe_experts": arch.num_moe_experts}
    if not moe_family:
        return {}
    want = dict(moe_router_score_function="softmax")
    if arch.family == "mixtral":
        want.update(moe_router_pre_softmax=False)
    if arch.family == "qwen2_moe":
        want.update(moe_shared_expert_gate=True)
        if not arch.moe_shared_expert_intermediate_size:
            return {"moe_shared_expert_intermediate_size": arch.moe_shared_expert_intermediate_size}
    else:
        want.update(moe_shared_expert_intermediate_size=None, moe_shared_expert_gate=False)
    return {k: getattr(arch, k) for k, v in want.items() if getattr(arch, k) != v}


def _moe_hf_kwargs(arch: ModelArch) -> dict:
    """The HF config entries of an MoE arch (its family already checked exportable)."""
    kwargs = dict(num_experts_per_tok=arch.moe_router_topk, router_aux_loss_coef=arch.moe_aux_loss_coeff)
    if arch.family == "mixtral":  # Mixtral's intermediate_size is the experts' width
        return dict(kwargs, num_local_experts=arch.num_moe_experts, intermediate_size=arch.moe_ffn_hidden_size,
                    sliding_window=None, router_jitter_noise=0.0)
    kwargs.update(num_experts=arch.num_moe_experts, moe_intermediate_size=arch.moe_ffn_hidden_size,
                  norm_topk_prob=not arch.moe_router_pre_softmax, decoder_sparse_step=1, mlp_only_layers=[])
    if arch.family == "qwen2_moe":
        kwargs.update(shared_expert_intermediate_size=arch.moe_shared_expert_intermediate_size, qkv_bias=True)
    return kwargs


def hf_config_dict(arch: ModelArch, dtype: str = "float32") -> dict:
    from transformers import AutoConfig

    _check_exportable(arch)
    eps_key = "norm_eps" if arch.family == "nemotron" else "rms_norm_eps"
    kwargs = {
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.kv_channels,
        "max_position_embeddings": arch.max_position_embeddings,
        eps_key: arch.norm_epsilon,
        "rope_theta": arch.rotary_base,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "hidden_act": _ACT[arch.activation],
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": arch.eos_token_id,
        "torch_dtype": dtype,
    }
    if arch.family == "nemotron":
        kwargs["partial_rotary_factor"] = arch.rotary_percent
    if arch.family == "mistral":
        kwargs["sliding_window"] = None  # converted models attend over the whole context
    if arch.rope_scaling:
        kwargs["rope_scaling"] = dict(arch.rope_scaling, rope_theta=arch.rotary_base)
    if arch.is_moe:
        kwargs.update(_moe_hf_kwargs(arch))
    cfg = AutoConfig.for_model(arch.family, **kwargs)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return cfg.to_dict()


def megatron_to_hf_tensors(state: dict[str, torch.Tensor], arch: ModelArch) -> dict[str, torch.Tensor]:
    out = {}
    for name, full in state.items():
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        if any(fused in name and name.replace(fused, norm) in state for fused, norm in _FUSED_NORM.items()):
            continue  # a TE fused copy of a norm that is also present on its own
        for hf_name, t in zip(hf_names(name, arch), _split(name, full, arch)):
            out[hf_name] = t.contiguous()
    return out


def check_output_dir(path: Path) -> None:
    """Refuse to replace a directory that is not a previous megaslim export."""
    if path.exists() and not path.is_dir():
        raise MegaslimError(f"{path} exists and is a file; choose an empty or new export.hf_dir")
    if path.exists() and any(path.iterdir()) and not (path / EXPORT_MARKER).is_file():
        raise MegaslimError(
            f"{path} exists and is not a megaslim export; choose an empty or new export.hf_dir"
        )


def export_hf(model, arch: ModelArch, out_dir: str | Path, *, tokenizer_dir: str | Path | None,
              dtype: torch.dtype = torch.float32, source: str = "") -> Path:
    """Write the (TP/PP-sharded) megatron `model` as an HF directory, atomically.

    Each pipeline stage writes its own safetensors shard; rank 0 writes the index, config, tokenizer,
    then renames the finished directory into place.
    """
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    rank = dist.get_rank()
    check_output_dir(out)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()

    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    state = gather_experts(gather_full_state(model, arch.vocab_size), arch.num_moe_experts)  # over TP, then EP
    fname = f"model-{stage + 1:05d}-of-{pp:05d}.safetensors"
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    keys: list[str] = []
    if writer:
        tensors = {k: v.to(dtype) for k, v in megatron_to_hf_tensors(state, arch).items()}
        save_file(tensors, str(partial / fname), metadata={"format": "pt"})
        keys = sorted(tensors)
    all_keys: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_keys, (fname, keys) if writer else None)
    if rank == 0:
        weight_map = {k: f for item in all_keys if item for f, ks in [item] for k in ks}
        total = sum(os.path.getsize(partial / f) for f in set(weight_map.values()))
        (partial / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        dtype_name = str(dtype).replace("torch.", "")
        (partial / "config.json").write_text(json.dumps(hf_config_dict(arch, dtype_name), indent=2))
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(partial))
        (partial / EXPORT_MARKER).write_text(json.dumps({"source": source, "arch": arch.to_dict()}, indent=2))
        mio.swap_dir(partial, out)
    dist.barrier()
    return out

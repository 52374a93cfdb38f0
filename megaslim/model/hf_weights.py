"""An HF directory's weight files checked before any model is built: every safetensors header is
readable and covers its file, and the tensor shapes agree with config.json (headers only, no tensor read)."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from megaslim.errors import MegaslimError
from megaslim.model.arch import ModelArch
from megaslim.model.hf import moe_hf_shapes

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_header(path: Path) -> dict:
    """{tensor name: (dtype, shape)} of a safetensors file; a truncated or foreign file is refused."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise MegaslimError(f"{path}: not a safetensors file (truncated or corrupt header); "
                                "download or export the model again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            raise MegaslimError(f"{path}: corrupt safetensors header (not JSON); download or export the model "
                                "again") from None
    end, out = 0, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise MegaslimError(f"{path}: corrupt safetensors header entry {name!r}") from None
        count = 1
        for d in shape:
            count *= d
        if dtype in _DTYPE_BYTES and stop - start != count * _DTYPE_BYTES[dtype]:
            raise MegaslimError(f"{path}: corrupt safetensors header: {name} {dtype}{shape} does not match its "
                                f"{stop - start} bytes")
        end = max(end, stop)
        out[name] = (dtype, shape)
    if 8 + n + end > size:
        raise MegaslimError(f"{path}: truncated ({size:,} bytes, its header describes {8 + n + end:,}); "
                            "download or export the model again")
    return out


def _expected(arch: ModelArch) -> dict[str, list[int]]:
    """Shapes config.json implies for the tensors every supported family names alike."""
    h, kv = arch.hidden_size, arch.kv_channels
    return {"model.embed_tokens.weight": [arch.vocab_size, h],
            "self_attn.q_proj.weight": [arch.num_attention_heads * kv, h],
            "self_attn.k_proj.weight": [arch.num_query_groups * kv, h],
            "self_attn.o_proj.weight": [h, arch.num_attention_heads * kv],
            "mlp.down_proj.weight": [h, arch.ffn_hidden_size], **moe_hf_shapes(arch)}


def check_hf_weights(path: Path, arch: ModelArch) -> None:
    """The safetensors files of HF directory `path` are whole and agree with its config.json (`arch`)."""
    files = sorted(path.glob("*.safetensors"))
    shapes: dict[str, list[int]] = {}
    for f in files:
        shapes.update({k: s for k, (_, s) in safetensors_header(f).items()})
    if not shapes:
        return  # pytorch_model.bin (read with weights_only=True when loaded), or no weights: said then
    expected, wrong = _expected(arch), []
    for name, shape in shapes.items():
        short = re.sub(r"\.experts\.\d+\.", ".experts.N.", re.sub(r"^model\.layers\.\d+\.", "", name))
        want = expected.get(name if name.startswith("model.embed") else short)
        if want is not None and shape != want:
            wrong.append(f"{name} {shape} (config.json implies {want})")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if layers and max(layers) + 1 != arch.num_layers:
        wrong.append(f"{max(layers) + 1} layers in the weights, num_hidden_layers={arch.num_layers} in config.json")
    experts = {int(m.group(1)) for k in shapes if (m := re.search(r"\.experts\.(\d+)\.", k))}
    if arch.is_moe and experts and max(experts) + 1 != arch.num_moe_experts:
        wrong.append(f"{max(experts) + 1} experts in the weights, {arch.num_moe_experts} in config.json")
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise MegaslimError(f"{path}: config.json disagrees with the weights: {'; '.join(wrong[:3])}{more}")

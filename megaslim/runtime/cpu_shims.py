"""Let megatron-core run on CPU (gloo) by patching the few places that assume CUDA (four shims).

Applied only when CUDA is absent (`apply_cpu_shims` is a no-op otherwise) and idempotent.
Each patch says what it replaces and why; nothing in megatron-core's files is edited.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Shim 3: pipeline schedules and p2p helpers allocate with `device="cuda"` or call `.cuda()`;
    route such tensors to the CPU. Integer devices (current_device() results) are never produced,
    because shim 1 makes current_device() return "cpu".
    Shim 4: megatron's optimizers and gradient clipping assert `t.type() == 'torch.cuda.FloatTensor'`;
    `Tensor.type()` (the query form, no arguments) reports CPU tensors under their CUDA type name."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def apply_cpu_shims() -> bool:
    """Patch torch/megatron for CPU execution. Returns True if the shims are (now) active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    from megatron.core.tensor_parallel import random as mrandom

    # Shim 1: rotary embeddings and p2p buffers pass torch.cuda.current_device() as a device.
    torch.cuda.current_device = lambda: "cpu"

    # Shim 2: the model-parallel RNG tracker saves/restores CUDA generator states (used by
    # initialisation and dropout forks); back it with the CPU generator instead.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the generator directly.)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    # Shim 3: schedules call torch.cuda.synchronize() and allocate on "cuda" (see _CudaToCpuMode).
    torch.cuda.synchronize = lambda device=None: None
    _CudaToCpuMode().__enter__()  # stays on the mode stack for the life of the process
    _APPLIED = True
    return True

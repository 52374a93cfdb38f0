"""Process-level runtime: distributed init, CPU shims, seeding, rank-0 logging."""
from megaslim.runtime.cpu_shims import apply_cpu_shims
from megaslim.runtime.distributed import (
    Runtime,
    destroy,
    init_runtime,
    main_guard,
    rank0_print,
)
from megaslim.runtime.layout import ParallelLayout, launcher_world_size

__all__ = ["ParallelLayout", "Runtime", "launcher_world_size", "apply_cpu_shims", "destroy", "init_runtime",
           "main_guard", "rank0_print"]

import warnings as _warnings

# megatron-core warns at import about optional CUDA extensions (apex, TE) that CPU runs never have.
for _msg in (r".*(Apex|Transformer Engine)( and Apex)? (is|are) not installed.*",
             r".*full scope is deprecated.*"):
    _warnings.filterwarnings("ignore", message=_msg)

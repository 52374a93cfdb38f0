"""Process-level runtime: distributed init, CPU shims, seeding, rank-0 logging."""
from megaslim.runtime.cpu_shims import apply_cpu_shims
from megaslim.runtime.distributed import (
    Runtime,
    destroy,
    init_runtime,
    main_guard,
    rank0_print,
)

__all__ = ["Runtime", "apply_cpu_shims", "destroy", "init_runtime", "main_guard", "rank0_print"]

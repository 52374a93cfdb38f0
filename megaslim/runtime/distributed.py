"""Distributed init from the torchrun environment (nccl on GPU, gloo on CPU) and megatron model parallel."""
from __future__ import annotations

import ctypes
import datetime
import os
import random
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from megaslim.errors import MegaslimError
from megaslim.runtime.cpu_shims import apply_cpu_shims
from megaslim.runtime.layout import check_layout, launcher_world_size


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    device: torch.device
    backend: str
    ep: int = 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_runtime(*, tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 1234, timeout_s: int = 1800) -> Runtime:
    """Initialise torch.distributed and megatron's parallel state; works with or without torchrun."""
    from megatron.core import parallel_state, tensor_parallel

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    rank, world = int(os.environ["RANK"]), launcher_world_size()
    # a plain one-process run needs no TCP rendezvous: an in-process store cannot race other jobs for a port
    standalone = world == 1 and "MASTER_PORT" not in os.environ
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ and not standalone:
        os.environ["MASTER_PORT"] = str(_free_port())
    local_rank = int(os.environ["LOCAL_RANK"])
    dp = check_layout(world, tp, pp, ep)

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        apply_cpu_shims()
        # torchrun pins OMP_NUM_THREADS=1; share the cores among the local ranks instead.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        device, backend = torch.device("cpu"), "gloo"

    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"store": dist.HashStore()} if standalone else {}),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
        )
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return Runtime(rank, world, local_rank, tp, pp, dp, device, backend, ep)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank0_print(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


_PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """A torchrun worker dies with its launcher. torchrun starts each worker in a session of its own,
    so a launcher killed hard (SIGKILL, the OOM killer) would leave its workers training on, holding
    devices and writing checkpoints under a rerun of the same job."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() == 1:  # the launcher was gone before the request could take effect
        os._exit(1)


def main_guard(main: Callable[[], None]) -> None:
    """Run a launcher's main. Any exception on any rank ends this process at once with exit code 1
    (torchrun then stops the other ranks), so a failing rank never leaves the job hanging on a
    collective. User errors print one line (exit 2); others print the traceback, prefixed with the rank.
    A user error before the process group exists comes from the checks every rank runs alike: only the
    first rank of each node says it (nodes may see different files), the others exit quietly."""
    rank = os.environ.get("RANK", "0")
    die_with_launcher()
    try:
        main()
    except SystemExit:
        raise
    except MegaslimError as err:
        if rank == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        elif dist.is_initialized() or os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"[rank {rank}] error: {err}", file=sys.stderr, flush=True)
        if rank != "0":  # an other rank that exits first makes torchrun stop rank 0 before it prints
            time.sleep(5)  # (it may still be cleaning up, e.g. removing a failed save): let it speak
        os._exit(2)
    except BaseException:  # noqa: BLE001 - report and bail out of every collective
        sys.stderr.write(f"[rank {rank}] " + traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)
    else:
        destroy()

"""Run real multi-process jobs (torchrun, gloo on CPU) from tests, always under a timeout."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str | Path, *args: str, nproc: int = 1, timeout: int = 300,
             check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc script args`; raises with both output streams on failure."""
    script = Path(script)
    if not script.is_absolute():
        script = (WORKERS / script) if (WORKERS / script).exists() else ROOT / script
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--monitor-interval=0.2", str(script), *map(str, args)]
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", TORCH_CPP_LOG_LEVEL="ERROR")
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc

"""Run real multi-process jobs (torchrun, gloo on CPU) from tests, always under a timeout."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str | Path, *args: str, nproc: int = 1, timeout: int = 300,
             check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc script args`; raises with both output streams on failure.
    A one-process run that must succeed starts the script directly with torchrun's environment (the
    launcher's agent costs seconds per call and changes nothing for one worker); runs that may fail keep
    the real launcher, whose exit handling is part of what they test."""
    script = Path(script)
    if not script.is_absolute():
        script = (WORKERS / script) if (WORKERS / script).exists() else ROOT / script
    direct = nproc == 1 and check
    launcher = [] if direct else ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                                  f"--master-port={free_port()}", "--monitor-interval=0.2"]
    cmd = [sys.executable, *launcher, str(script), *map(str, args)]
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", TORCH_CPP_LOG_LEVEL="ERROR")
    if direct:  # what torchrun sets for its one worker (no MASTER_PORT: megaslim then needs no rendezvous)
        full_env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc


def _last_step(metrics: Path) -> int:
    """The highest step metrics.jsonl records (a line cut short by a kill is skipped)."""
    steps = [0]
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return max(steps)


def kill_after_step(script: Path, args, out: Path, step: int, *, nproc: int = 1, env: dict | None = None,
                    timeout: float = 240) -> None:
    """torchrun `script args` and SIGKILL its launcher's process group once out/metrics.jsonl holds
    `step`; then assert that no worker outlived the launcher (torchrun starts them in sessions of their
    own, out of the kill's reach: they must die with it, or they train on under the rerun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           str(script), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})))
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and _last_step(out / "metrics.jsonl") < step:
            if proc.poll() is not None:
                raise AssertionError(f"run ended before it could be killed: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    _assert_worker_gone(f"output_dir={out}")


def _running_with(text: str) -> list[int]:
    """pids of the live (not zombie) processes whose command line holds `text`."""
    pids = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            pids.append(int(proc_dir.name))
    return pids


def _assert_worker_gone(text: str, seconds: float = 30.0) -> None:
    deadline = time.time() + seconds
    while _running_with(text) and time.time() < deadline:
        time.sleep(0.1)
    assert not _running_with(text), "a worker outlived its killed launcher"

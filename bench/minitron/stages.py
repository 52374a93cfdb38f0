"""Running one stage as a subprocess: a launcher under torchrun or a bench worker, reused once finished."""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from bench.minitron.settings import ROOT
from megaslim.io import write_json

_ERR = re.compile(r"^(?:\[rank \d+\] )?error: (.*)$")


class StageError(Exception):
    """A stage that was refused (the launcher's one-line user error) or failed; the row's status."""

    def __init__(self, kind: str, msg: str):
        super().__init__(f"{kind}: {msg}")
        self.kind, self.msg = kind, msg


def failure_message(stderr: str) -> tuple[str, str]:
    """("refused", msg) for a launcher's one-line user error, else ("failed", last traceback line)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = _ERR.match(ln)
        if m:
            return "refused", m.group(1)
    tb = [ln for ln in lines if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", ln)]
    return "failed", (tb[-1] if tb else (lines[-1] if lines else "no output"))[:300]


def child_env(threads: int) -> dict:
    """The environment of every stage: `threads` OpenMP threads, no warning noise in the logs."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore", TORCH_CPP_LOG_LEVEL="ERROR")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finished(out_dir: Path, done: str, overrides: list[str]) -> Optional[tuple[dict, float]]:
    """A previous run's (done JSON, seconds) when out_dir holds one with the same overrides."""
    done_path, stamp = out_dir / done, out_dir / "bench_stage.json"
    if not (done_path.is_file() and stamp.is_file()):
        return None
    st = json.loads(stamp.read_text())
    if st.get("overrides", overrides) != overrides:
        raise StageError("failed", f"{out_dir} holds a run with other overrides ({st['overrides']}); "
                         "remove it or choose another --out-dir")
    return json.loads(done_path.read_text()), st["seconds"]


def launch(script: str, config: str, overrides: list[str], out_dir: Path, done: str, what: str, *,
           env: dict, retry_failed: bool = False) -> tuple[dict, float]:
    """Run launch/<script> (torchrun, 1 process) into out_dir unless out_dir/done exists; returns that
    JSON and the wall seconds (recorded beside it, so a rerun reports the original time). A stage that
    failed before is not rerun unless `retry_failed`."""
    reused = _finished(out_dir, done, overrides)
    if reused is not None:
        return reused
    fail = out_dir / "bench_failed.json"
    if fail.is_file() and not retry_failed:
        f = json.loads(fail.read_text())
        raise StageError(f["kind"], f["msg"])
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", f"--master-port={_free_port()}",
           str(ROOT / "launch" / script), "--config", str(config), *overrides, f"output_dir={out_dir}"]
    print(f"[bench] {what}: {' '.join(shlex.quote(c) for c in cmd[2:])}", flush=True)
    t0 = time.time()
    with open(out_dir / "bench_stdout.log", "w") as so, open(out_dir / "bench_stderr.log", "w") as se:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=so, stderr=se).returncode
    seconds = time.time() - t0
    if rc != 0 or not (out_dir / done).is_file():
        kind, msg = failure_message((out_dir / "bench_stderr.log").read_text())
        write_json(fail, {"kind": kind, "msg": msg, "rc": rc})
        print(f"[bench] {what}: {kind}: {msg}", flush=True)
        raise StageError(kind, msg)
    fail.unlink(missing_ok=True)
    write_json(out_dir / "bench_stage.json", {"seconds": seconds, "overrides": overrides, "command": cmd})
    print(f"[bench] {what}: done in {seconds:.0f} s", flush=True)
    return json.loads((out_dir / done).read_text()), seconds


def run_worker(mode: str, spec: dict, out: Path, what: str, *, env: dict) -> dict:
    """bench.minitron.workers `mode` on `spec` in a subprocess (it initialises torch.distributed); its
    result JSON is `out` (an existing `out` is reused)."""
    if out.is_file():
        return json.loads(out.read_text())
    spec_path = out.with_suffix(".spec.json")
    write_json(spec_path, spec)
    print(f"[bench] {what}", flush=True)
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "bench.minitron.workers", mode, str(spec_path)],
                            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not out.is_file():
        _, msg = failure_message(log.read_text())
        raise StageError("failed", f"{mode} worker: {msg}")
    return json.loads(out.read_text())

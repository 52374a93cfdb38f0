"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd (Debian's slurm-wlm + munge) started
as child processes of the test session, every file under one temporary directory, stopped by their own pids."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = {"munged": "munge", "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm"}
CLIENTS = ("sbatch", "scontrol", "scancel", "sinfo")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}


def find(name: str) -> str | None:
    """A Slurm/munge program on PATH or in the sbin directories Debian installs daemons to."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def missing() -> str | None:
    """Why no cluster can start here (programs absent, not root), or None."""
    absent = [n for n in (*DAEMONS, *CLIENTS) if find(n) is None]
    if absent:
        return (f"{', '.join(absent)} not installed (apt-get update && apt-get install -y slurm-wlm munge)")
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, host: str, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    """One node (this machine's CPUs, no GPUs), one partition, no accounting; finished jobs stay visible in
    `scontrol show job` for MinJobAge seconds; a requeued job waits cred_expire seconds (default 120)."""
    return f"""\
ClusterName=megaslimtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=30
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/slurmd
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MinJobAge=3600
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """`start()` writes the config and a munge key under `root` and starts the three daemons; `env` is the
    environment for the Slurm client commands; `stop()` cancels any job left and stops each daemon by pid."""

    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for leaked in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if leaked != "SLURM_CONF":  # a test session inside a Slurm job must not submit into that job
                del self.env[leaked]

    # --- start / stop ------------------------------------------------------------------------------
    def start(self, timeout: float = 120) -> SlurmCluster:
        for sub in ("munge", "ctld", "slurmd"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(slurm_conf(self.root, self.host, self.cpus, free_port(), free_port()))
        m = self.root / "munge"
        self._spawn("munged", [find("munged"), "--foreground", "--force", f"--socket={m}/munge.socket",
                               f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed", "--num-threads=2"])
        self._wait(lambda: (m / "munge.socket").exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", [find("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout,
                   "slurmctld does not answer `scontrol ping`")
        self._spawn("slurmd", [find("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
        self._wait(self._node_idle, timeout, "the node did not come up idle in `sinfo`")
        return self

    def stop(self, timeout: float = 60) -> None:
        """scancel of every job left, wait for them to end, then each daemon by its own pid (slurmd and
        slurmctld first, munged last)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user=root", check=False)
            self._wait(self._no_live_jobs, timeout, None)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL)
        log.close()

    def _wait(self, ready, timeout: float, message: str | None) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return True
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead and message:
                raise RuntimeError(f"{message}: {', '.join(dead)} exited\n{self.logs()}")
            time.sleep(0.5)
        if message:
            raise RuntimeError(f"{message} within {timeout:.0f}s\n{self.logs()}")
        return False

    def _node_idle(self) -> bool:
        res = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return res.returncode == 0 and res.stdout.strip().startswith("idle")

    def _no_live_jobs(self) -> bool:
        res = self.run("scontrol", "show", "job", "-o", check=False)
        return res.returncode != 0 or not any(
            self.parse(line).get("JobState") not in FINISHED for line in res.stdout.splitlines()
            if line.startswith("JobId="))

    def logs(self, tail: int = 3000) -> str:
        out = []
        for name in ("munge/munged.log", "slurmctld.log", "slurmd.log", "munged.stdout", "slurmctld.stdout",
                     "slurmd.stdout"):
            path = self.root / name
            if path.exists():
                out.append(f"--- {name} ---\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # --- client commands ---------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 120, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run([find(argv[0]) or argv[0], *argv[1:]], env={**self.env, **(env or {})},
                             capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    @staticmethod
    def parse(line: str) -> dict[str, str]:
        """`scontrol show job -o` line -> {key: value} (values with spaces are rare and not needed here)."""
        return dict(m.groups() for m in re.finditer(r"(\w[\w:/]*)=(\S*)", line))

    def job(self, job_id: str) -> dict[str, str]:
        return self.parse(self.run("scontrol", "show", "job", "-o", job_id).stdout)

    def wait_job(self, job_id: str, states=FINISHED, timeout: float = 600) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout:.0f}s: {self.job(job_id)}")

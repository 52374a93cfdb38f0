"""launch/slurm/*.sbatch submitted to a real one-node Slurm cluster (tests/slurm_cluster.py) in host mode
(CONTAINER_IMAGE=none, this venv's python), 2 processes over gloo: same outputs as torchrun run directly,
a bad config's one-line error in the job log, scancel + resubmission with resume=true, scontrol requeue."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_utils import ROOT, free_port, torchrun
from safetensors.torch import load_file
from slurm_cluster import SlurmCluster, missing

from megaslim.model.hf import HFReader

pytestmark = [pytest.mark.slurm, pytest.mark.dist]

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
SLURM = ROOT / "launch" / "slurm"
NPROC = 2
DISTILL_STEPS = ["train.train_iters=8", "checkpoint.save_interval=2"]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The cluster for the session; skipped without the packages, except in CI where that is a failure."""
    reason = missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the local Slurm cluster cannot start: {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    with SlurmCluster(root) as cluster:
        yield cluster
    shutil.rmtree(root, ignore_errors=True)  # the daemons are stopped: their state goes too


def submit(slurm: SlurmCluster, name: str, log_dir: Path, *overrides: str, wait: bool = True,
           sbatch_args=(), **env) -> tuple[str, int]:
    """sbatch launch/slurm/<name>.sbatch in host mode with NPROC processes; (job id, sbatch's exit)."""
    knobs = {"CONTAINER_IMAGE": "none", "MEGASLIM_PYTHON": sys.executable, "NPROC_PER_NODE": str(NPROC),
             "MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore", "TORCH_CPP_LOG_LEVEL": "ERROR", **env}
    res = slurm.run("sbatch", "--parsable", *(["--wait"] if wait else []), f"--output={log_dir}/%x-%j.out",
                    *sbatch_args, str(SLURM / f"{name}.sbatch"), *overrides,
                    env=knobs, cwd=ROOT, check=False, timeout=900)
    assert res.stdout.strip(), f"sbatch printed no job id: {res.stderr}"
    return res.stdout.strip().split(";")[0], res.returncode


def job_log(log_dir: Path, name: str, job_id: str) -> str:
    return (log_dir / f"megaslim-{name}-{job_id}.out").read_text(errors="replace")


def assert_completed(slurm, log_dir, name, job_id, rc):
    info = slurm.job(job_id)
    assert rc == 0 and info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        info, job_log(log_dir, name, job_id)[-4000:])


def assert_same_hf(a: Path, b: Path):
    ra, rb = HFReader(a), HFReader(b)
    assert ra.keys() == rb.keys()
    for k in ra.keys():
        assert torch.equal(ra.get(k), rb.get(k)), k


def losses(out: Path) -> dict[int, float]:
    by_step = {}
    for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        if "loss" in r:
            by_step[r["step"]] = r["loss"]  # a resumed run rewrites its steps: the last one counts
    return by_step


def prune_args(model, out):
    return [f"model.load={model}", f"output_dir={out}", f"export.hf_dir={out}/hf", f"data.calib_path={TEXT}",
            f"data.eval_path={TEXT}", "data.seq_length=32", "importance.num_samples=8", "eval.num_samples=4",
            "data.micro_batch_size=2", "prune.export_config.hidden_size=48",
            "prune.export_config.ffn_hidden_size=96", "prune.export_config.num_layers=2"]


def distill_args(model, plan, out, *extra):
    return [f"model.load={model}", f"output_dir={out}", f"prune.plan_path={plan}", f"export.hf_dir={out}/hf",
            f"data.train_path={TEXT}", f"data.eval_path={TEXT}", "data.seq_length=32",
            "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3", "train.min_lr=3e-4",
            "train.warmup_iters=1", "eval.num_samples=4", "data.micro_batch_size=2", *DISTILL_STEPS, *extra]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """The CONFIG of every job here (the schema's defaults; DP over the 2 processes), given to the direct
    torchrun runs too."""
    path = tmp_path_factory.mktemp("slurm_config") / "tiny.yaml"
    path.write_text("parallel:\n  tensor_model_parallel_size: 1\n  pipeline_model_parallel_size: 1\n")
    return path


@pytest.fixture(scope="module")
def pruned(slurm, config, tiny_llama_tok, tmp_path_factory):
    """prune.sbatch (DP=2) and the same command under torchrun directly."""
    tmp = tmp_path_factory.mktemp("slurm_prune")
    job_id, rc = submit(slurm, "prune", tmp, *prune_args(tiny_llama_tok, tmp / "job"), CONFIG=str(config))
    torchrun(ROOT / "launch" / "prune.py", "--config", config, *prune_args(tiny_llama_tok, tmp / "direct"),
             nproc=NPROC, timeout=600)
    return {"tmp": tmp, "job_id": job_id, "rc": rc, "config": str(config)}


@pytest.fixture(scope="module")
def distill_ref(pruned, tiny_llama_tok):
    """The uninterrupted distillation (torchrun directly, DP=2) that every Slurm distillation must match."""
    out = pruned["tmp"] / "distill_direct"
    torchrun(ROOT / "launch" / "distill.py", "--config", pruned["config"],
             *distill_args(tiny_llama_tok, pruned["tmp"] / "job" / "prune_plan.json", out), nproc=NPROC, timeout=600)
    return out


def test_prune_job_equals_torchrun(slurm, pruned):
    tmp = pruned["tmp"]
    assert_completed(slurm, tmp, "prune", pruned["job_id"], pruned["rc"])
    log = job_log(tmp, "prune", pruned["job_id"])
    assert "2 process(es), host" in log and "--container" not in log
    job, direct = (load_file(tmp / run / "importance.safetensors") for run in ("job", "direct"))
    assert job.keys() == direct.keys() and job
    for k in job:
        assert torch.equal(job[k], direct[k]), k
    assert_same_hf(tmp / "job" / "hf", tmp / "direct" / "hf")
    assert (tmp / "job" / "prune_plan.json").read_text() == (tmp / "direct" / "prune_plan.json").read_text()


def test_distill_job_equals_torchrun(slurm, pruned, distill_ref, tiny_llama_tok, tmp_path):
    plan = pruned["tmp"] / "job" / "prune_plan.json"
    job_id, rc = submit(slurm, "distill", tmp_path, *distill_args(tiny_llama_tok, plan, tmp_path / "out"),
                        CONFIG=pruned["config"])
    assert_completed(slurm, tmp_path, "distill", job_id, rc)
    ref = losses(distill_ref)
    assert sorted(ref) == list(range(1, 9)) and losses(tmp_path / "out") == ref  # bitwise on CPU
    assert_same_hf(tmp_path / "out" / "hf", distill_ref / "hf")


def test_bad_config_fails_fast_with_one_line_error(slurm, pruned, tiny_llama_tok, tmp_path):
    plan = pruned["tmp"] / "job" / "prune_plan.json"
    job_id, rc = submit(slurm, "distill", tmp_path,
                        *distill_args(tiny_llama_tok, plan, tmp_path / "out", "train.global_batch_size=3"),
                        CONFIG=pruned["config"], NPROC_PER_NODE="1")  # see the report: rank-1 exit race
    info = slurm.job(job_id)
    log = job_log(tmp_path, "distill", job_id)
    assert rc != 0 and info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, log[-3000:])
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert errors and all("not a multiple of train.micro_batch_size" in e for e in errors), log[-3000:]
    assert not (tmp_path / "out" / "checkpoint").exists()


def wait_for_checkpoint(slurm, job_id, out: Path, log_dir: Path, timeout: float = 600) -> None:
    """Until the running job has saved a checkpoint and trained past it (so it dies mid-run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = out / "checkpoint" / "latest"
        if latest.is_file() and (out / "metrics.jsonl").is_file() and max(losses(out), default=0) >= 3:
            return
        state = slurm.job(job_id)["JobState"]
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job_id} ended ({state}) before it could be interrupted:\n"
                        f"{job_log(log_dir, 'distill', job_id)[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"job {job_id}: no checkpoint after {timeout:.0f}s")


def assert_continued(out: Path, ref: Path, saved: int):
    """The resumed run kept the steps up to its checkpoint (`saved`), trained the rest bitwise as the
    uninterrupted run did (CPU) and finished."""
    got, want = losses(out), losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, 9)) and saved in (2, 4, 6)
    assert got == want, {step: (got[step], want[step]) for step in want if got[step] != want[step]}
    summary = json.loads((out / "distill.json").read_text())
    assert summary["finished"] and summary["steps"] == 8 and (out / "hf" / "config.json").is_file()


def test_scancel_then_resubmit_with_resume(slurm, pruned, distill_ref, tiny_llama_tok, tmp_path):
    plan, out = pruned["tmp"] / "job" / "prune_plan.json", tmp_path / "out"
    job_id, _ = submit(slurm, "distill", tmp_path, *distill_args(tiny_llama_tok, plan, out), wait=False,
                       CONFIG=pruned["config"])
    wait_for_checkpoint(slurm, job_id, out, tmp_path)
    slurm.run("scancel", job_id)
    assert slurm.wait_job(job_id, timeout=300)["JobState"] == "CANCELLED"
    saved = int((out / "checkpoint" / "latest").read_text())
    assert saved in (2, 4, 6) and not (out / "hf").exists()
    # The last checkpoint loads: the resubmitted job continues it, and ends where the uninterrupted run did.
    job2, rc = submit(slurm, "distill", tmp_path, *distill_args(tiny_llama_tok, plan, out, "resume=true"),
                       CONFIG=pruned["config"])
    assert_completed(slurm, tmp_path, "distill", job2, rc)
    assert "resumed" in job_log(tmp_path, "distill", job2)
    assert_continued(out, distill_ref, saved)


def test_scontrol_requeue_resumes_without_an_edit(slurm, pruned, distill_ref, tiny_llama_tok, tmp_path):
    plan, out = pruned["tmp"] / "job" / "prune_plan.json", tmp_path / "out"
    job_id, _ = submit(slurm, "distill", tmp_path, *distill_args(tiny_llama_tok, plan, out), wait=False,
                       CONFIG=pruned["config"])
    wait_for_checkpoint(slurm, job_id, out, tmp_path)
    slurm.run("scontrol", "requeue", job_id)
    info = slurm.wait_job(job_id, timeout=900)
    log = job_log(tmp_path, "distill", job_id)  # --open-mode=append: both attempts
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-4000:])
    first, _, second = log.partition("(restart 1)")
    assert "(restart 0)" in first and "resume=true" not in first and "resume=true" in second
    assert "resumed" in second
    assert_continued(out, distill_ref, 2)  # the first attempt had saved step 2 at least

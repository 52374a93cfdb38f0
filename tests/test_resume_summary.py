"""Reruns and resumes tell the truth: a killed-then-resumed distillation reports what an uninterrupted
one does (distill.json, metrics.jsonl: each step once), an exit_interval stop reports its own end loss,
resume=true says when there is nothing to resume and changes nothing on a finished run, and a prune
rerun does not replace its checkpoint."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from dist_utils import ROOT, kill_after_step, torchrun

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
DISTILL = ROOT / "launch" / "distill.py"
COMMON = ["train.train_iters=5", "checkpoint.save_interval=2", "eval.interval=2"]
# one thread: reductions in one order, so runs in separate processes agree bitwise; rich keeps each
# summary row on one line
ENV = {"OMP_NUM_THREADS": "1", "COLUMNS": "300"}
pytestmark = pytest.mark.dist  # every test here runs torchrun (an agent and its worker)


def _args(model_dir, out, plan, *extra):
    return [f"model.load={model_dir}", f"output_dir={out}", f"prune.plan_path={plan}",
            f"data.train_path={TEXT}", f"data.eval_path={TEXT}", "data.seq_length=32",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr=3e-3", "train.min_lr=3e-4",
            "train.warmup_iters=1", "eval.num_samples=4", "data.micro_batch_size=2", *COMMON, *extra]


def _records(out, tolerant=False):
    """metrics.jsonl without its timings (a line cut short by a kill is skipped when `tolerant`)."""
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            if tolerant:
                continue
            raise
        r.pop("tokens_per_s", None)
        rows.append(r)
    return rows


def _assert_each_step_once(rows):
    train = [r["step"] for r in rows if "loss" in r]
    assert train == sorted(set(train)), train
    assert [r["step"] for r in rows if "loss" not in r] == [0]  # the one evaluation before step 1


def _summary(out):
    """distill.json without its timing, the run's own folder written as <out>."""
    record = json.loads((out / "distill.json").read_text().replace(str(out), "<out>"))
    assert record.pop("seconds") > 0
    record.pop("resumed_from")
    return record


@pytest.fixture(scope="module")
def plan(tiny_pruned):
    return tiny_pruned / "prune_plan.json"


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_tok, plan, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "full"
    torchrun(DISTILL, *_args(tiny_llama_tok, out, plan), nproc=1, timeout=300, env=ENV)
    return out


def test_killed_then_resumed_run_reports_like_an_uninterrupted_one(tiny_llama_tok, plan, uninterrupted, tmp_path):
    killed = tmp_path / "killed"
    kill_after_step(DISTILL, _args(tiny_llama_tok, killed, plan), killed, 3, env=ENV)
    latest = int((killed / "checkpoint" / "latest").read_text())
    assert latest in (2, 4)
    proc = torchrun(DISTILL, *_args(tiny_llama_tok, killed, plan, "resume=true"), nproc=1, timeout=300, env=ENV)
    resumed = json.loads((killed / "distill.json").read_text())["resumed_from"]
    assert resumed == latest, (resumed, latest)
    assert f"from step {latest}" in " ".join(proc.stdout.split()), proc.stdout  # the summary says where
    rows = _records(killed)
    _assert_each_step_once(rows)
    assert rows == _records(uninterrupted)  # bitwise on CPU, all but timings
    assert _summary(killed) == _summary(uninterrupted)  # start loss from step 0, end loss at step 5
    full = json.loads((uninterrupted / "distill.json").read_text())
    assert full["finished"] and full["steps"] == 5
    assert (full["student_eval_loss_start"], full["student_eval_loss"]) == (rows[0]["eval_loss"], rows[-1]["eval_loss"])


def test_exit_interval_nothing_to_resume_and_finished_run(tiny_llama_tok, plan, uninterrupted, tmp_path):
    out = tmp_path / "x"
    board = out / "tensorboard"
    board.mkdir(parents=True)
    (board / "events.out.tfevents.1.stale").write_bytes(b"an earlier attempt")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 9, "loss": 1.0}) + "\n")
    args = _args(tiny_llama_tok, out, plan)

    # resume=true with nothing to resume: said in the log and in the summary; an earlier attempt's
    # metrics and TensorBoard events go
    proc = torchrun(DISTILL, *args, "resume=true", "train.exit_interval=3", nproc=1, timeout=300, env=ENV)
    assert f"resume=true: nothing to resume in {out / 'checkpoint'}" in proc.stdout
    assert f"no: nothing to resume in {out / 'checkpoint'}, started from step 0" in proc.stdout
    events = sorted(p.name for p in board.iterdir())
    assert len(events) == 1 and "stale" not in events[0]
    rows = _records(out)
    _assert_each_step_once(rows)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    # the exit_interval stop reports its own end: the held-out loss measured at step 3
    part = json.loads((out / "distill.json").read_text())
    assert not part["finished"] and part["steps"] == 3
    assert part["student_eval_loss"] == rows[-1]["eval_loss"] != part["student_eval_loss_start"]
    assert part["student_eval_loss_start"] == rows[0]["eval_loss"]

    # resumed to the end: the whole run's summary, as if it had never stopped
    torchrun(DISTILL, *args, "resume=true", nproc=1, timeout=300, env=ENV)
    assert _summary(out) == _summary(uninterrupted)
    rows, full = _records(out), _records(uninterrupted)
    _assert_each_step_once(rows)
    rows[3].pop("eval_loss")  # the exit_interval stop evaluated at step 3 (eval.interval=2 did not)
    assert rows == full
    assert json.loads((out / "distill.json").read_text())["seconds"] > part["seconds"]

    # resume=true on the finished run: says so, changes nothing
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    proc = torchrun(DISTILL, *args, "resume=true", nproc=1, timeout=300, env=ENV)
    assert f"the run in {out} is finished (step 5" in proc.stdout and "nothing changed" in proc.stdout
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_prune_rerun_keeps_the_checkpoint(tiny_llama_tok, tiny_pruned, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(tiny_pruned, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "prune.py"), f"model.load={tiny_llama_tok}",
                           f"output_dir={out}", f"data.calib_path={TEXT}", f"data.eval_path={TEXT}",
                           "data.seq_length=32", "prune.export_config.hidden_size=56"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{out / 'checkpoint'} already holds a checkpoint" in proc.stderr
    assert "choose another output_dir" in proc.stderr and "Traceback" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before

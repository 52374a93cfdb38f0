"""Distillation loop: identical steps at every layout, exact resume after SIGKILL, bad input."""
import json

import pytest
import torch
from dist_utils import ROOT, kill_after_step, torchrun

from megaslim.model.hf import HFReader

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"


def _args(model_dir, out, plan, *extra):
    return [f"model.load={model_dir}", f"output_dir={out}", f"prune.plan_path={plan}",
            f"data.train_path={TEXT}", f"data.eval_path={TEXT}", "data.seq_length=32",
            "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3", "train.min_lr=3e-4",
            "train.warmup_iters=1", "eval.num_samples=4", "data.micro_batch_size=2", *extra]


@pytest.fixture(scope="module")
def plan(tiny_pruned):
    """A width+depth plan for the tiny model (made once by prune.py, so every run prunes alike)."""
    return tiny_pruned / "prune_plan.json"


def _losses(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for r in lines:
        if "loss" in r:
            assert r["step"] not in by_step, f"step {r['step']} appears twice in {out / 'metrics.jsonl'}"
            by_step[r["step"]] = r["loss"]
    return by_step


@pytest.mark.dist
def test_steps_identical_at_tp2_pp2_dp2_tp2pp2(tiny_llama_tok, plan, tmp_path):
    runs = {}
    for tp, pp, n in [(1, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 2), (2, 2, 4)]:
        out = tmp_path / f"tp{tp}pp{pp}n{n}"
        torchrun(ROOT / "launch" / "distill.py", *_args(tiny_llama_tok, out, plan, "train.train_iters=3",
                 f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
                 f"export.hf_dir={out}/hf"), nproc=n, timeout=300)
        runs[(tp, pp, n)] = out
    base = runs.pop((1, 1, 1))
    ref_losses, ref_w = _losses(base), HFReader(base / "hf")
    assert sorted(ref_losses) == [1, 2, 3] and ref_losses[3] < ref_losses[1]
    summary = json.loads((base / "distill.json").read_text())
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 8 * 32
    assert (base / "loss_curve.png").is_file()
    assert list((base / "tensorboard").glob("events.out.tfevents.*"))
    for key, out in runs.items():
        losses = _losses(out)
        for step in (1, 2, 3):
            assert losses[step] == pytest.approx(ref_losses[step], abs=1e-5), (key, step)
        w = HFReader(out / "hf")
        for k in ref_w.keys():
            assert (w.get(k) - ref_w.get(k)).abs().max().item() < 1e-5, (key, k)


@pytest.mark.dist
def test_sigkill_then_resume_equals_uninterrupted(tiny_llama_tok, plan, tmp_path):
    common = ["train.train_iters=6", "checkpoint.save_interval=2"]
    full = tmp_path / "full"
    torchrun(ROOT / "launch" / "distill.py", *_args(tiny_llama_tok, full, plan, *common,
             f"export.hf_dir={full}/hf"), nproc=2, timeout=300)

    killed = tmp_path / "killed"
    kill_after_step(ROOT / "launch" / "distill.py", _args(tiny_llama_tok, killed, plan, *common,
                    f"export.hf_dir={killed}/hf"), killed, 3, nproc=2)
    assert not (killed / "hf").exists()
    assert (killed / "checkpoint" / "latest").read_text().strip() in ("2", "4")

    torchrun(ROOT / "launch" / "distill.py", *_args(tiny_llama_tok, killed, plan, *common, "resume=true",
             f"export.hf_dir={killed}/hf"), nproc=2, timeout=300)
    a, b = _losses(full), _losses(killed)  # each step once: the resumed run dropped the killed one's later steps
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    evals = [r["step"] for r in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r]
    assert evals == sorted(set(evals)) and evals[0] == 0
    for step in range(1, 7):
        assert a[step] == b[step], step  # bitwise on CPU
    wa, wb = HFReader(full / "hf"), HFReader(killed / "hf")
    for k in wa.keys():
        assert torch.equal(wa.get(k), wb.get(k)), k


@pytest.mark.parametrize("extra, needle", [
    (["distill.intermediate_layer_pairs=[[5,0]]"], "student layer 5 is out of range"),
    (["train.global_batch_size=3"], "not a multiple of train.micro_batch_size"),
    (["distill.teacher.load=/nope"], "no such file or directory"),
])
def test_bad_input(launch, tiny_llama_tok, plan, tmp_path, extra, needle):
    proc = launch("distill.py", *_args(tiny_llama_tok, tmp_path / "o", plan, *extra), timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "checkpoint").exists()


def test_existing_run_needs_resume_flag(launch, tiny_llama_tok, plan, tmp_path):
    out = tmp_path / "o"
    first = launch("distill.py", *_args(tiny_llama_tok, out, plan, "train.train_iters=2"))  # one process, world 1
    assert first.returncode == 0, first.stderr[-8000:]
    proc = launch("distill.py", *_args(tiny_llama_tok, out, plan, "train.train_iters=2"), timeout=120)
    assert proc.returncode == 2 and "set resume=true" in proc.stderr

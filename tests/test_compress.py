"""The compress command (megaslim/commands/compress.py): two prune -> distill rounds on a tiny model,
family outputs, and a rerun that skips."""
import json

import pytest
from dist_utils import ROOT, torchrun
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.dist  # multi-process (torchrun over gloo)

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"


@pytest.mark.timeout(1800)  # a hang guard for two multi-process runs, not a speed check
def test_two_rounds_then_rerun_skips(tiny_llama_tok, tmp_path):
    out = tmp_path / "c"
    args = [f"model.load={tiny_llama_tok}", f"output_dir={out}", f"data.train_path={TEXT}",
            f"data.eval_path={TEXT}", f"data.calib_path={TEXT}", "data.seq_length=32", "importance.num_samples=8",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.train_iters=3",
            "train.warmup_iters=1", "train.lr=3e-3", "eval.num_samples=4",
            "compress.rounds=[{hidden_size: 56, num_layers: 3}, {hidden_size: 48, ffn_hidden_size: 96}]"]
    torchrun(ROOT / "launch" / "compress.py", *args, nproc=2, env={"OMP_NUM_THREADS": "1"})
    result = json.loads((out / "compress.json").read_text())
    r1, r2 = result["rounds"]
    assert r1["params"] > r2["params"] and result["source_params"] > r1["params"]
    for r in (r1, r2):
        assert r["tokens"] == 3 * 4 * 32
    hf = AutoModelForCausalLM.from_pretrained(str(out / "round2" / "hf"))
    assert (hf.config.num_hidden_layers, hf.config.hidden_size, hf.config.intermediate_size) == (3, 48, 96)
    # round 2 pruned the distilled round-1 student, and was distilled from the original teacher
    plan2 = json.loads((out / "round2" / "prune" / "prune_plan.json").read_text())
    assert plan2["source"]["hidden_size"] == 56 and plan2["source"]["num_layers"] == 3
    assert (out / "family.png").is_file()

    stamp = (out / "round2" / "distill" / "distill.json").stat().st_mtime
    proc = torchrun(ROOT / "launch" / "compress.py", *args, nproc=2)
    assert "megaslim distill" not in proc.stdout and "megaslim prune" not in proc.stdout
    assert (out / "round2" / "distill" / "distill.json").stat().st_mtime == stamp
    assert json.loads((out / "compress.json").read_text())["rounds"][1]["distilled_loss"] == r2["distilled_loss"]


def test_budget_round_with_teacher_correction(tiny_llama_tok, tmp_path):
    """One round whose shape is searched for a parameter budget, after a teacher-correction stage."""
    import importlib.util
    import math

    from megaslim.sources import resolve_source, source_arch

    arch = source_arch(resolve_source(str(tiny_llama_tok)))
    budget = math.floor(0.8 * arch.num_params())
    out = tmp_path / "b"
    proc = torchrun(ROOT / "launch" / "compress.py", f"model.load={tiny_llama_tok}", f"output_dir={out}",
                    f"data.train_path={TEXT}", f"data.eval_path={TEXT}", f"data.calib_path={TEXT}",
                    "data.seq_length=32", "importance.num_samples=8", "train.micro_batch_size=2",
                    "train.global_batch_size=4", "train.train_iters=2", "train.warmup_iters=0", "train.lr=3e-3",
                    "eval.num_samples=4", f"prune.target_params={budget}", "prune.search.top_k=2",
                    "prune.search.train_iters=1", "prune.search.max_width_pruning=0.5",
                    "compress.teacher_correction_iters=3", "compress.lm_eval_tasks=[lambada_openai]",
                    env={"OMP_NUM_THREADS": "1"})
    result = json.loads((out / "compress.json").read_text())
    tc = result["teacher_correction"]
    assert tc["tokens"] == 3 * 4 * 32 and tc["student_eval_loss"] < tc["student_eval_loss_start"]
    (r1,) = result["rounds"]
    assert r1["params"] <= budget
    # the round pruned the corrected teacher and distilled from it
    prune_cfg = (out / "round1" / "prune" / "config.yaml").read_text()
    assert str(out / "teacher_correction" / "checkpoint") in prune_cfg
    assert r1["teacher_loss"] == tc["student_eval_loss"]
    ranking = json.loads((out / "round1" / "prune" / "search.json").read_text())["ranking"]
    assert len(ranking) == 2 and ranking[0]["params"] == r1["params"]
    if importlib.util.find_spec("lm_eval") is None:
        assert "lm-evaluation-harness is not installed" in proc.stdout and r1["lm_eval"] is None
    assert "teacher (corrected)" in proc.stdout


def test_a_stage_stopped_by_exit_interval_stops_compress_then_resumes(tiny_llama_tok, tmp_path):
    out = tmp_path / "x"
    args = [f"model.load={tiny_llama_tok}", f"output_dir={out}", f"data.train_path={TEXT}", f"data.eval_path={TEXT}",
            f"data.calib_path={TEXT}", "data.seq_length=32", "importance.num_samples=8", "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.train_iters=2", "train.warmup_iters=0", "eval.num_samples=4",
            "compress.teacher_correction_iters=2", "prune.export_config.hidden_size=56"]
    proc = torchrun(ROOT / "launch" / "compress.py", *args, "train.exit_interval=1", env={"OMP_NUM_THREADS": "1"})
    assert "teacher correction stopped at step 1" in proc.stdout
    assert not (out / "round1").exists() and not (out / "compress.json").exists()
    torchrun(ROOT / "launch" / "compress.py", *args, env={"OMP_NUM_THREADS": "1"})
    result = json.loads((out / "compress.json").read_text())
    assert result["teacher_correction"]["tokens"] == 2 * 4 * 32 and len(result["rounds"]) == 1

"""compress.py: two prune -> distill rounds on a tiny model, family outputs, and a rerun that skips."""
import json
import time

from transformers import AutoModelForCausalLM

from dist_utils import ROOT, torchrun

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"


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
    t0 = time.time()
    proc = torchrun(ROOT / "launch" / "compress.py", *args, nproc=2)
    assert "megaslim distill" not in proc.stdout and "megaslim prune" not in proc.stdout
    assert (out / "round2" / "distill" / "distill.json").stat().st_mtime == stamp
    assert json.loads((out / "compress.json").read_text())["rounds"][1]["distilled_loss"] == r2["distilled_loss"]
    assert time.time() - t0 < 120

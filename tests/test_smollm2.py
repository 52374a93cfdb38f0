"""The real embedded default, SmolLM2-135M-Instruct: megatron matches transformers at TP=1/3 and PP=2."""
import json
from pathlib import Path

import pytest
import torch
from dist_utils import ROOT, torchrun
from transformers import AutoModelForCausalLM, AutoTokenizer

from megaslim.data.packing import pack_rows, read_documents

pytestmark = [pytest.mark.slow, pytest.mark.dist]
TEXT = Path(__file__).resolve().parent / "data" / "hamlet_excerpt.txt"
SEQ, ROWS = 128, 4


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def rows(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    return pack_rows(read_documents(TEXT), tok, seq_length=SEQ, num_rows=ROWS)


def test_arch_and_greedy_answer(smollm2_dir, hf_model):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"]) == (30, 576, 9, 3, 1536)
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = hf_model.generate(ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.parametrize("tp, pp", [(1, 1), (3, 1), (1, 2)])
def test_logits_match_transformers(smollm2_dir, hf_model, rows, tmp_path, tp, pp):
    tokens = rows[:1, :-1].contiguous()
    torch.save(tokens, tmp_path / "tokens.pt")
    export = tmp_path / "export" if tp == 3 else None
    torchrun("forward_logits.py", smollm2_dir, tp, pp, tmp_path / "tokens.pt", tmp_path / "out.pt",
             *([export] if export else []), nproc=tp * pp, timeout=600)
    with torch.no_grad():
        ref = hf_model(tokens).logits
    assert (torch.load(tmp_path / "out.pt") - ref).abs().max().item() < 1e-3
    if export:  # HF -> megatron (TP=3) -> HF is exact
        from megaslim.model.hf import HFReader

        a, b = HFReader(smollm2_dir), HFReader(export)
        assert a.keys() == b.keys()
        assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
        assert AutoTokenizer.from_pretrained(str(export))("Hamlet").input_ids == \
            AutoTokenizer.from_pretrained(str(smollm2_dir))("Hamlet").input_ids


def _evaluate(tmp_path, tp, pp, name):
    out = tmp_path / name
    torchrun(ROOT / "launch" / "evaluate.py", f"data.eval_path={TEXT}", f"data.seq_length={SEQ}",
             f"eval.num_samples={ROWS}", "data.micro_batch_size=2", f"output_dir={out}",
             f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
             nproc=tp * pp, timeout=600)
    return json.loads((out / "eval.json").read_text())


def test_evaluate_matches_transformers_at_any_layout(hf_model, rows, tmp_path):
    with torch.no_grad():
        logits = hf_model(rows[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
    r1 = _evaluate(tmp_path, 1, 1, "tp1")
    assert r1["tokens"] == ROWS * SEQ and r1["num_samples"] == ROWS and r1["seq_length"] == SEQ
    assert abs(r1["loss"] - ref.item()) < 1e-4
    assert abs(r1["ppl"] - torch.exp(ref).item()) / r1["ppl"] < 1e-4
    for tp, pp in [(3, 1), (1, 2)]:
        assert abs(_evaluate(tmp_path, tp, pp, f"tp{tp}pp{pp}")["loss"] - r1["loss"]) < 1e-5

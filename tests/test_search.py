"""prune.target_params: candidate enumeration (within budget, TP-valid, bounded per axis), bad budgets
refused before compute, and the search end to end through launch/prune.py on a tiny model at TP=2."""
import itertools
import json
import math

import pytest
from dist_utils import ROOT, torchrun

from megaslim.config import SearchConfig
from megaslim.errors import MegaslimError
from megaslim.model.arch import ModelArch
from megaslim.prune.search import _width_values, candidates, enumerate_shapes
from megaslim.sources import resolve_source, source_arch

pytestmark = pytest.mark.dist  # multi-process (torchrun over gloo)

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
# SmolLM2-135M's shape (9 heads in 3 groups, tied embeddings)
SMOL = ModelArch(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
                 kv_channels=64, vocab_size=49152, tie_word_embeddings=True)


def _valid(a: ModelArch, src: ModelArch, s: SearchConfig, tp: int) -> None:
    assert a.num_attention_heads % tp == 0 and a.ffn_hidden_size % tp == 0 and a.num_query_groups % tp == 0
    assert a.hidden_size % a.num_attention_heads == 0  # transformers' rule for Llama-family export
    assert a.num_query_groups == src.num_query_groups and a.kv_channels == src.kv_channels
    for axis in ("hidden_size", "ffn_hidden_size", "num_attention_heads"):
        assert (1 - s.max_width_pruning) * getattr(src, axis) - 1e-9 <= getattr(a, axis) <= getattr(src, axis)
    assert (1 - s.max_depth_pruning) * src.num_layers - 1e-9 <= a.num_layers <= src.num_layers


@pytest.mark.parametrize("tp", [1, 3])
def test_candidates_are_within_budget_valid_and_nearest(tp):
    s = SearchConfig(top_k=6)
    budget = 0.8 * SMOL.num_params()
    cands = candidates(SMOL, budget, s, tps=(tp,))
    assert len(cands) == 6
    every = enumerate_shapes(SMOL, s, tps=(tp,))
    for a in every:
        _valid(a, SMOL, s, tp)
    for a in cands:
        assert a.num_params() <= budget
    # nearest the budget: no shape left out lies between the budget and the chosen ones
    worst = min(a.num_params() for a in cands)
    left_out = [a for a in every if worst < a.num_params() <= budget and a not in cands]
    assert not left_out
    assert [a.num_params() for a in cands] == sorted((a.num_params() for a in cands), reverse=True)


def test_enumeration_covers_the_grid_and_respects_skips():
    s = SearchConfig(max_width_pruning=0.5, max_depth_pruning=0.25, width_step=0.25,
                     hparams_to_skip=["num_attention_heads"])
    shapes = enumerate_shapes(SMOL, s)
    # layers 30..23 (ceil(22.5)); ffn 1536 x (1, .75, .5) rounded down to 8; hidden x (1, .75, .5) to 9 heads
    layers = range(23, 31)
    ffn = [1536, 1152, 768]
    hidden = [576, 432, 288]
    expect = {(n, h, f) for n, h, f in itertools.product(layers, hidden, ffn)}
    assert {(a.num_layers, a.hidden_size, a.ffn_hidden_size) for a in shapes} == expect
    assert {a.num_attention_heads for a in shapes} == {9}
    assert len(shapes) == len(expect)


def test_bad_budgets_are_refused_with_the_reason():
    s = SearchConfig()
    with pytest.raises(MegaslimError, match="not below the source"):
        candidates(SMOL, SMOL.num_params(), s)
    smallest = min(a.num_params() for a in enumerate_shapes(SMOL, s))
    with pytest.raises(MegaslimError, match="below the smallest shape"):
        candidates(SMOL, smallest - 1, s)
    assert candidates(SMOL, smallest, s)[0].num_params() == smallest


def test_launcher_refuses_a_budget_with_an_explicit_shape_before_compute(tiny_llama_tok, tmp_path):
    proc = torchrun(ROOT / "launch" / "prune.py", f"model.load={tiny_llama_tok}", f"output_dir={tmp_path / 'o'}",
                    "prune.target_params=100000", "prune.export_config.hidden_size=48", check=False)
    assert proc.returncode != 0 and "unset prune.export_config.hidden_size" in proc.stderr + proc.stdout
    assert not (tmp_path / "o" / "importance.safetensors").exists()


def test_search_end_to_end_at_tp2(tiny_llama_tok, tmp_path):
    arch = source_arch(resolve_source(str(tiny_llama_tok)))
    budget = math.floor(0.85 * arch.num_params())
    out = tmp_path / "s"
    torchrun(ROOT / "launch" / "prune.py", f"model.load={tiny_llama_tok}", f"output_dir={out}",
             f"prune.target_params={budget}", "prune.search.top_k=3", "prune.search.train_iters=2",
             "prune.search.max_width_pruning=0.5", f"data.train_path={TEXT}", f"data.eval_path={TEXT}",
             f"data.calib_path={TEXT}", "data.seq_length=32", "importance.num_samples=8", "eval.num_samples=4",
             "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr=3e-3",
             "parallel.tensor_model_parallel_size=2", nproc=2, env={"OMP_NUM_THREADS": "1"})
    search = json.loads((out / "search.json").read_text())
    ranking = search["ranking"]
    assert len(ranking) == 3
    assert [r["trained_loss"] for r in ranking] == sorted(r["trained_loss"] for r in ranking)
    for r in ranking:
        assert r["params"] <= budget and r["num_attention_heads"] % 2 == 0 and r["ffn_hidden_size"] % 2 == 0
        assert math.isfinite(r["pruned_loss"]) and math.isfinite(r["trained_loss"])
    # the expected candidate set: the 3 shapes nearest the budget
    s = SearchConfig(max_width_pruning=0.5, top_k=3)
    want = {a.num_params() for a in candidates(arch, budget, s, tps=(2,))}
    assert {r["params"] for r in ranking} == want
    prune = json.loads((out / "prune.json").read_text())
    best = ranking[0]
    assert prune["params_after"] == best["params"]
    plan = json.loads((out / "prune_plan.json").read_text())
    assert all(plan["target"][k] == best[k] for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                     "num_attention_heads"))


def test_candidates_respect_target_pp_and_two_four_inputs():
    s = SearchConfig(top_k=8, max_width_pruning=0.55)
    budget = 0.6 * SMOL.num_params()
    for a in candidates(SMOL, budget, s, pp=4):
        assert a.num_layers % 4 == 0
    for a in candidates(SMOL, budget, s, input_multiple=4):
        assert a.hidden_size % 4 == 0 and a.ffn_hidden_size % 4 == 0
        assert (a.num_attention_heads * a.kv_channels) % 4 == 0
    # without the 2:4 rule the nearest shapes include hidden sizes that 4 does not divide (multiples of 9)
    assert any(a.hidden_size % 4 for a in candidates(SMOL, budget, s))


def test_width_grid_is_exact_in_integers():
    values = _width_values(5120, SearchConfig(width_step=0.05, max_width_pruning=0.4), 8)
    assert 3328 in values  # 5120 x 0.65, which floating point makes 3327.99...
    assert values == sorted({5120 * k // 20 // 8 * 8 for k in range(12, 21)}, reverse=True)

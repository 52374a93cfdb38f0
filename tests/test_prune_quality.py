"""Pruning quality on the real SmolLM2-135M: importance-ranked pruning beats random and reversed rankings
(width, width with heads, depth), the HF export of a pruned model matches megatron, and head folding's
measured effect. In-process at TP=1 (prune_in_memory); the numbers printed here are in docs/pruning.md."""
import dataclasses

import pytest
import torch

from megaslim.config import ExportConfigShape, ImportanceConfig, ModelConfig
from megaslim.data.calibration import calibration_rows
from megaslim.data.corpora import default_corpus
from megaslim.data.packing import pack_rows, read_documents
from megaslim.eval import evaluate_rows
from megaslim.importance.calibrate import compute_importance
from megaslim.model.hf import export_hf
from megaslim.prune.apply import prune_in_memory
from megaslim.prune.iterative import iterative_plans
from megaslim.prune.plan import build_plan, target_shape
from megaslim.sources import load_model

pytestmark = pytest.mark.slow
CALIB_ROWS, EVAL_ROWS, SEQ = 16, 8, 128

# The three same-size SmolLM2 targets of issue 6 (about half of the 106.2M non-embedding parameters).
TARGETS = {
    "width": dict(hidden_size=468, ffn_hidden_size=750),  # Llama-3.1-Minitron-4B-Width analogue
    "heads": dict(num_attention_heads=6, ffn_hidden_size=642),  # 3 groups x 2 heads
    "depth": dict(num_layers=15),
}


@pytest.fixture(scope="module")
def smol(smollm2_dir, megatron_tp1):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model, arch, _ = load_model(ModelConfig(load=str(smollm2_dir)))
    calib = calibration_rows(None, tok, num_samples=CALIB_ROWS, seq_length=SEQ)
    held_out = pack_rows(read_documents(default_corpus("valid")), tok, seq_length=SEQ, num_rows=EVAL_ROWS)
    scores, _ = compute_importance(model, arch, calib, ImportanceConfig(), micro_batch_size=4,
                                   transformer_impl="local")

    def loss(m):
        return evaluate_rows(m, held_out, vocab_size=arch.vocab_size, micro_batch_size=4)["loss"]

    base = loss(model)
    print(f"\nSmolLM2-135M held-out loss ({EVAL_ROWS} x {SEQ} tokens of the default valid split): {base:.4f}")
    return dict(model=model, arch=arch, scores=scores, held_out=held_out, loss=loss, base=base, calib=calib)


def _ranking(scores, arch, kind: str, seed: int = 0):
    """The same ImportanceScores with every ranking negated ("reversed") or replaced by noise ("random")."""
    g = torch.Generator().manual_seed(seed)

    def f(t):
        return -t if kind == "reversed" else torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype)

    heads = f(scores.heads)
    return dataclasses.replace(
        scores, heads=heads, query_groups=heads.reshape(arch.num_layers, arch.num_query_groups, -1).sum(-1),
        neurons=f(scores.neurons), channels=f(scores.channels), layer_bi=f(scores.layer_bi), layer_loss=None)


def _pruned(smol, scores, target, **plan_kw):
    arch = smol["arch"]
    plan = build_plan(arch, target_shape(arch, ExportConfigShape(**target), tp=1, hf_export=True), scores, **plan_kw)
    return prune_in_memory(smol["model"], plan, ModelConfig()), plan


@pytest.mark.parametrize("name", list(TARGETS))
def test_importance_ranking_beats_random_and_reversed(smol, name):
    arch, scores, loss = smol["arch"], smol["scores"], smol["loss"]
    rankings = {"importance": scores, "reversed": _ranking(scores, arch, "reversed")}
    rankings.update({f"random{s}": _ranking(scores, arch, "random", s) for s in range(3)})
    losses = {}
    for kind, s in rankings.items():
        model, plan = _pruned(smol, s, TARGETS[name])
        non_emb = plan.target_arch.num_params() - arch.vocab_size * plan.target_arch.hidden_size
        losses[kind] = loss(model)
        del model
    print(f"\n{name} ({non_emb / 1e6:.2f}M non-embedding params): "
          + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    others = {k: v for k, v in losses.items() if k != "importance"}
    assert losses["importance"] < min(others.values()), losses


def test_hf_export_of_width_pruned_model_matches_megatron(smol, tmp_path):
    from transformers import AutoModelForCausalLM

    model, plan = _pruned(smol, smol["scores"], TARGETS["width"])
    out = export_hf(model, plan.target_arch, tmp_path / "hf", tokenizer_dir=None)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert (hf.config.hidden_size, hf.config.intermediate_size, hf.config.num_attention_heads,
            hf.config.head_dim) == (468, 750, 9, 64)
    tokens = smol["held_out"][:2, :-1]
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        ours = model(tokens, pos, None)[..., :plan.target_arch.vocab_size]
        ref = hf(tokens).logits
    diff = (ours - ref).abs().max().item()
    print(f"\nwidth-pruned HF export vs megatron: max |logit diff| {diff:.2e}")
    assert diff < 1e-3


def test_head_folding_measured_effect(smol):
    """heads 9 -> 6 (3 groups x 2): post-prune held-out loss without folding, with the LaCo-style merge
    (prune.fold_heads) and with the proj_sum variant. Reported, not ranked: see docs/pruning.md."""
    losses = {}
    for mode in (False, "laco", "proj_sum"):
        model, plan = _pruned(smol, smol["scores"], TARGETS["heads"], fold_heads=mode)
        assert bool(plan.fold_heads) == bool(mode)
        losses[mode or "none"] = smol["loss"](model)
        del model
    print("\nheads 9 -> 6, ffn 642, fold_heads: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    assert len({round(v, 6) for v in losses.values()}) == 3  # each mode really changes the weights
    assert all(v == v and v < 20 for v in losses.values())


@pytest.mark.parametrize("name", ["width", "depth"])
def test_iterative_two_steps_measured(smol, name):
    """prune.iterative=2 (re-scored on the half-pruned model) against single shot, same calibration rows."""
    arch = smol["arch"]
    target = target_shape(arch, ExportConfigShape(**TARGETS[name]), tp=1, hf_export=True)

    def score(m, a, step):
        return compute_importance(m, a, smol["calib"], ImportanceConfig(), micro_batch_size=4,
                                  transformer_impl="local")[0]

    chain = iterative_plans(smol["model"], arch, target, 2, score=score, model_cfg=ModelConfig(),
                            first_scores=smol["scores"])
    model = prune_in_memory(smol["model"], chain, ModelConfig())
    assert chain[-1].target_arch == target and len(chain) == 2
    single, _ = _pruned(smol, smol["scores"], TARGETS[name])
    it, one = smol["loss"](model), smol["loss"](single)
    print(f"\n{name}: single shot {one:.4f}, iterative=2 {it:.4f}")
    assert it == it and it < 20

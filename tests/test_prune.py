"""Pruning: slicing invariants, plan validation, layout independence, and ranking quality on SmolLM2."""
import json
from dataclasses import replace

import pytest
import torch

from dist_utils import ROOT, torchrun
from megaslim.config import ExportConfigShape, ModelConfig
from megaslim.errors import MegaslimError
from megaslim.importance.scores import ImportanceScores
from megaslim.prune.plan import PrunePlan, build_plan, target_shape


def _logits(model, tokens):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None)


@pytest.fixture(scope="module")
def tiny(tiny_llama, megatron_tp1):
    from megaslim.model.load import load_model

    model, arch, _ = load_model(ModelConfig(load=str(tiny_llama)))
    torch.manual_seed(0)
    return model, arch, torch.randint(0, 250, (2, 12))


def _keep_all_plan(arch, **changes):
    L, H, G = arch.num_layers, arch.num_attention_heads, arch.num_query_groups
    plan = PrunePlan(source=arch.to_dict(), target=arch.to_dict(), keep_layers=list(range(L)),
                     keep_channels=list(range(arch.hidden_size)),
                     keep_groups={i: list(range(G)) for i in range(L)},
                     keep_heads={i: list(range(H)) for i in range(L)},
                     keep_neurons={i: list(range(arch.ffn_hidden_size)) for i in range(L)})
    return replace(plan, **changes)


def test_keep_all_random_permutation_reproduces_logits(tiny):
    from megaslim.prune.apply import prune_in_memory

    model, arch, tokens = tiny
    g = torch.Generator().manual_seed(1)
    perm = lambda n: torch.randperm(n, generator=g).tolist()  # noqa: E731
    L, n = arch.num_layers, arch.heads_per_group
    groups = {i: perm(arch.num_query_groups) for i in range(L)}
    heads = {i: [grp * n + j for grp in groups[i] for j in perm(n)] for i in range(L)}
    plan = _keep_all_plan(arch, keep_channels=perm(arch.hidden_size), keep_groups=groups, keep_heads=heads,
                          keep_neurons={i: perm(arch.ffn_hidden_size) for i in range(L)})
    permuted = prune_in_memory(model, plan, ModelConfig())
    assert (_logits(permuted, tokens) - _logits(model, tokens)).abs().max().item() < 1e-5
    # and the permutation really moved weights
    assert not torch.equal(permuted.decoder.layers[0].mlp.linear_fc2.weight, model.decoder.layers[0].mlp.linear_fc2.weight)


def test_dropping_heads_and_neurons_equals_zeroing_their_inputs(tiny):
    from megaslim.prune.apply import prune_in_memory

    model, arch, tokens = tiny
    L, n, hd = arch.num_layers, arch.heads_per_group, arch.kv_channels
    drop_heads = {i: [g * n + (i + g) % n for g in range(arch.num_query_groups)] for i in range(L)}
    drop_neurons = {i: [3 + i, 17, 100 - i] for i in range(L)}
    plan = _keep_all_plan(
        arch,
        target=replace(arch, num_attention_heads=arch.num_attention_heads - arch.num_query_groups,
                       ffn_hidden_size=arch.ffn_hidden_size - 3).to_dict(),
        keep_heads={i: [h for h in range(arch.num_attention_heads) if h not in drop_heads[i]] for i in range(L)},
        keep_neurons={i: [j for j in range(arch.ffn_hidden_size) if j not in drop_neurons[i]] for i in range(L)})
    pruned = prune_in_memory(model, plan, ModelConfig())

    zeroed = prune_in_memory(model, _keep_all_plan(arch), ModelConfig())  # a copy
    with torch.no_grad():
        for i, layer in enumerate(zeroed.decoder.layers):
            for h in drop_heads[i]:
                layer.self_attention.linear_proj.weight[:, h * hd:(h + 1) * hd] = 0
            layer.mlp.linear_fc2.weight[:, drop_neurons[i]] = 0
    assert (_logits(pruned, tokens) - _logits(zeroed, tokens)).abs().max().item() < 1e-5
    assert (_logits(pruned, tokens) - _logits(model, tokens)).abs().max().item() > 1e-3


def test_dropping_a_layer_equals_skipping_it(tiny):
    from megaslim.prune.apply import prune_in_memory

    model, arch, tokens = tiny
    plan = build_plan(arch, arch, None, drop_layers=[2])
    pruned = prune_in_memory(model, plan, ModelConfig())
    assert plan.target_arch.num_layers == 3 and plan.keep_layers == [0, 1, 3]
    handle = model.decoder.layers[2].register_forward_hook(
        lambda m, a, kw, out: (kw["hidden_states"], out[1]), with_kwargs=True)
    try:
        skipped = _logits(model, tokens)
    finally:
        handle.remove()
    assert (_logits(pruned, tokens) - skipped).abs().max().item() < 1e-5


def _scores(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(arch.num_layers, arch.num_attention_heads, generator=g)
    return ImportanceScores(
        heads=heads, query_groups=heads.reshape(arch.num_layers, arch.num_query_groups, -1).sum(-1),
        neurons=torch.rand(arch.num_layers, arch.ffn_hidden_size, generator=g),
        channels=torch.rand(arch.hidden_size, generator=g), layer_bi=torch.rand(arch.num_layers, generator=g))


def test_plan_keeps_top_scores_in_original_order_and_roundtrips_json(tiny):
    _, arch, _ = tiny
    scores = _scores(arch)
    target = target_shape(arch, ExportConfigShape(hidden_size=48, ffn_hidden_size=64, num_attention_heads=4,
                                                  num_layers=3), tp=2, hf_export=True)
    plan = build_plan(arch, target, scores)
    assert plan.keep_channels == sorted(torch.topk(scores.channels, 48).indices.tolist())
    assert plan.keep_layers == sorted(torch.topk(scores.layer_bi, 3).indices.tolist())
    for layer in plan.keep_layers:
        assert plan.keep_neurons[layer] == sorted(torch.topk(scores.neurons[layer], 64).indices.tolist())
        hs = scores.heads[layer].reshape(4, 2)
        assert plan.keep_heads[layer] == [g * 2 + int(hs[g].argmax()) for g in range(4)]
    assert PrunePlan.from_json(plan.to_json()) == plan
    other = replace(arch, hidden_size=32)
    with pytest.raises(MegaslimError, match="another model"):
        plan.check_applies_to(other)


def test_contiguous_depth_block_has_least_total_importance(tiny):
    _, arch, _ = tiny
    scores = _scores(arch)
    scores.layer_bi = torch.tensor([0.9, 0.1, 0.2, 0.05])
    plan = build_plan(arch, replace(arch, num_layers=2), scores, contiguous=True)
    # blocks of two: [0, 1] = 1.0, [1, 2] = 0.3, [2, 3] = 0.25 -> drop 2..3 (not the two smallest, 1 and 3)
    assert plan.keep_layers == [0, 1]
    assert build_plan(arch, replace(arch, num_layers=2), scores).keep_layers == [0, 2]


@pytest.mark.parametrize("shape, tp, hf, needle", [
    (dict(hidden_size=80), 1, False, "larger than the source's 64"),
    (dict(ffn_hidden_size=0), 1, False, "must be > 0"),
    (dict(ffn_hidden_size=90), 4, False, r"not divisible by TP=4; nearest valid: \[88, 92\]"),
    (dict(num_attention_heads=6), 1, False, "not a multiple of num_query_groups=4"),
    (dict(num_attention_heads=6, num_query_groups=2), 1, False, "3 heads per group"),
    (dict(num_query_groups=1, num_attention_heads=2), 2, False, "< TP=2"),
    (dict(hidden_size=50, num_attention_heads=4), 1, True, r"nearest valid hidden sizes: \[48, 52\]"),
])
def test_bad_targets_are_refused(tiny, shape, tp, hf, needle):
    _, arch, _ = tiny
    with pytest.raises(MegaslimError, match=needle):
        target_shape(arch, ExportConfigShape(**shape), tp=tp, hf_export=hf)


# ------------------------------------------------------------------------------------------------
# The launcher at several layouts: identical pruned weights wherever it ran and was written


PRUNE_ARGS = ["prune.export_config.hidden_size=48", "prune.export_config.ffn_hidden_size=96",
              "prune.export_config.num_attention_heads=4", "prune.export_config.num_layers=2",
              "data.seq_length=32", "eval.num_samples=4", "data.micro_batch_size=2"]


def _prune(tmp_path, model_dir, name, tp, pp, ttp, tpp, *extra):
    out = tmp_path / name
    torchrun(ROOT / "launch" / "prune.py", f"model.load={model_dir}", f"output_dir={out}",
             f"export.hf_dir={out}/hf", f"parallel.tensor_model_parallel_size={tp}",
             f"parallel.pipeline_model_parallel_size={pp}", f"prune.target_tensor_model_parallel_size={ttp}",
             f"prune.target_pipeline_model_parallel_size={tpp}", *PRUNE_ARGS, *extra,
             nproc=max(tp * pp, ttp * tpp), timeout=300)
    return out


def test_pruned_weights_identical_at_any_layout_and_export_matches(tiny_llama_tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from megaslim.model.hf import HFReader

    text = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
    data = [f"data.eval_path={text}", f"data.calib_path={text}", "importance.num_samples=8"]
    base = _prune(tmp_path, tiny_llama_tok, "base", 1, 1, 1, 1, *data)
    scores = base / "importance.safetensors"
    assert scores.is_file() and (base / "importance_heads.png").is_file()
    runs = [_prune(tmp_path, tiny_llama_tok, f"r{tp}{pp}{ttp}{tpp}", tp, pp, ttp, tpp, *data,
                   f"importance.scores_path={scores}")
            for tp, pp, ttp, tpp in [(2, 2, 1, 1), (2, 1, 1, 2), (1, 2, 2, 1)]]
    ref = HFReader(base / "hf")
    for run in runs:
        got = HFReader(run / "hf")
        assert got.keys() == ref.keys()
        for k in ref.keys():
            assert torch.equal(got.get(k), ref.get(k)), (run.name, k)
        assert json.loads((run / "eval.json").read_text())["loss"] == pytest.approx(
            json.loads((base / "eval.json").read_text())["loss"], abs=1e-5)

    # the HF export of the pruned model reproduces the pruned megatron model's held-out loss
    from transformers import AutoTokenizer

    from megaslim.data.packing import pack_rows, read_documents

    hf = AutoModelForCausalLM.from_pretrained(str(base / "hf")).eval()
    assert hf.config.num_hidden_layers == 2 and hf.config.hidden_size == 48 and hf.config.head_dim == 8
    rows = pack_rows(read_documents(text), AutoTokenizer.from_pretrained(str(base / "hf")), seq_length=32, num_rows=4)
    with torch.no_grad():
        logits = hf(rows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
    assert json.loads((base / "eval.json").read_text())["loss"] == pytest.approx(loss.item(), abs=1e-4)
    plan = PrunePlan.load(base / "prune_plan.json")
    assert plan.target_arch.num_params() == json.loads((base / "prune.json").read_text())["params_after"]

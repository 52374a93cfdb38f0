"""Pruning: slicing invariants, plan validation, layout independence, and ranking quality on SmolLM2."""
import json
from dataclasses import replace

import pytest
import torch
from dist_utils import ROOT, torchrun

from megaslim.config import ExportConfigShape, ImportanceConfig, ModelConfig, load_config
from megaslim.data.packing import pack_rows, read_documents
from megaslim.errors import MegaslimError
from megaslim.importance.calibrate import compute_importance
from megaslim.importance.scores import ImportanceScores
from megaslim.model.arch import ModelArch, check_parallel_layout
from megaslim.model.hf import HFReader
from megaslim.model.state import gather_full_state
from megaslim.prune.apply import prune_in_memory
from megaslim.prune.iterative import compose_plans, iterative_plans, step_shapes
from megaslim.prune.plan import PrunePlan, build_plan, fold_assignment, target_shape
from megaslim.prune.slicing import prune_state
from megaslim.sources import load_model


def _logits(model, tokens):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None)


@pytest.fixture(scope="module")
def tiny(tiny_llama, megatron_tp1):
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
    assert not torch.equal(permuted.decoder.layers[0].mlp.linear_fc2.weight,
                           model.decoder.layers[0].mlp.linear_fc2.weight)


def test_dropping_heads_and_neurons_equals_zeroing_their_inputs(tiny):
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


@pytest.mark.dist
def test_pruned_weights_identical_at_any_layout_and_export_matches(tiny_llama_tok, tmp_path):
    from transformers import AutoModelForCausalLM

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

    hf = AutoModelForCausalLM.from_pretrained(str(base / "hf")).eval()
    assert hf.config.num_hidden_layers == 2 and hf.config.hidden_size == 48 and hf.config.head_dim == 8
    rows = pack_rows(read_documents(text), AutoTokenizer.from_pretrained(str(base / "hf")), seq_length=32, num_rows=4)
    with torch.no_grad():
        logits = hf(rows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
    assert json.loads((base / "eval.json").read_text())["loss"] == pytest.approx(loss.item(), abs=1e-4)
    plan = PrunePlan.load(base / "prune_plan.json")
    assert plan.target_arch.num_params() == json.loads((base / "prune.json").read_text())["params_after"]


# ------------------------------------------------------------------------------------------------
# The three same-size SmolLM2 targets (configs/smollm2_prune_*.yaml)

SMOLLM2 = dict(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
               kv_channels=64, vocab_size=49152, tie_word_embeddings=True)


@pytest.mark.parametrize("name, non_embedding", [("width", 53_183_988), ("heads", 53_222_976), ("depth", 53_102_016)])
def test_smollm2_prune_configs_hit_half_the_non_embedding_params(name, non_embedding):
    cfg = load_config(ROOT / "configs" / f"smollm2_prune_{name}.yaml")
    arch = ModelArch(**SMOLLM2)
    target = target_shape(arch, cfg.prune.export_config, tp=cfg.parallel.tensor_model_parallel_size,
                          hf_export=cfg.export.hf_dir is not None)
    check_parallel_layout(target, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    emb = arch.vocab_size * target.hidden_size
    assert target.num_params() - emb == non_embedding
    assert round((target.num_params() - emb) / 1e6, 2) == {"width": 53.18, "heads": 53.22, "depth": 53.10}[name]
    assert abs(non_embedding / (arch.num_params() - arch.vocab_size * arch.hidden_size) - 0.5) < 0.005
    assert cfg.importance.num_samples * cfg.data.seq_length <= 64 * 256  # CPU-sized


# ------------------------------------------------------------------------------------------------
# Iterative pruning


def test_iterative_step_shapes_are_valid_and_end_at_the_target():
    arch = ModelArch(**SMOLLM2)
    target = replace(arch, hidden_size=468, ffn_hidden_size=642, num_attention_heads=3, num_query_groups=3,
                     num_layers=15)
    shapes = step_shapes(arch, target, 3, tp=3)
    assert shapes[-1] == target and len(shapes) == 3
    assert [(s.hidden_size, s.ffn_hidden_size, s.num_attention_heads, s.num_layers) for s in shapes[:2]] == \
        [(540, 1239, 6, 25), (504, 939, 6, 20)]  # heads per group 3 -> 2.33 -> 1.67 round to 2
    for s in shapes:
        check_parallel_layout(s, 3, 1)
    tiny = ModelArch(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=4,
                     kv_channels=8, vocab_size=250)
    small = replace(tiny, num_query_groups=2, num_attention_heads=2, ffn_hidden_size=96)
    mid = step_shapes(tiny, small, 2, tp=1)[0]  # groups 4 -> 3 -> 2, heads per group 2 -> 1.5 (halves up) -> 1
    assert (mid.num_query_groups, mid.num_attention_heads, mid.ffn_hidden_size) == (3, 6, 112)
    mid = step_shapes(tiny, small, 2, tp=2)[0]  # 3 groups do not divide by TP=2: rounded to 4
    assert (mid.num_query_groups, mid.num_attention_heads, mid.ffn_hidden_size) == (4, 8, 112)
    assert step_shapes(tiny, tiny, 3) == []  # nothing to do
    with pytest.raises(MegaslimError, match="must be >= 1"):
        step_shapes(tiny, small, 0)


def test_iterative_two_steps_reach_the_target_and_compose(tiny):
    model, arch, tokens = tiny
    torch.manual_seed(1)
    rows = torch.randint(0, 250, (4, 17))
    target = target_shape(arch, ExportConfigShape(hidden_size=40, ffn_hidden_size=64, num_attention_heads=2,
                                                  num_query_groups=2, num_layers=2), tp=1, hf_export=False)
    seen = []

    def score(m, a, step):
        seen.append((step, a.hidden_size))
        return compute_importance(m, a, rows, ImportanceConfig(), micro_batch_size=2, transformer_impl="local")[0]

    stepwise = {}
    chain = iterative_plans(model, arch, target, 2, score=score, model_cfg=ModelConfig(),
                            on_step=lambda i, p, m: stepwise.__setitem__(i, m))
    assert len(chain) == 2 and seen == [(0, 64), (1, 52)]  # re-scored on the half-pruned model
    assert chain[0].target_arch.hidden_size == 52 and chain[0].target_arch.num_layers == 3
    plan = compose_plans(chain)
    assert plan.target_arch == target == chain[-1].target_arch
    assert plan.source == arch.to_dict()
    # kept indices are ascending subsets of the source's, of the target's sizes
    assert len(plan.keep_layers) == 2 and set(plan.keep_layers) <= set(range(4))
    assert plan.keep_channels == sorted(plan.keep_channels) and len(plan.keep_channels) == 40
    assert set(plan.keep_channels) <= set(chain[0].keep_channels)
    for layer in plan.keep_layers:
        assert set(plan.keep_groups[layer]) <= set(chain[0].keep_groups[layer]) and len(plan.keep_groups[layer]) == 2
        assert set(plan.keep_heads[layer]) <= set(chain[0].keep_heads[layer]) and len(plan.keep_heads[layer]) == 2
        assert all(h // 2 in plan.keep_groups[layer] for h in plan.keep_heads[layer])
        assert set(plan.keep_neurons[layer]) <= set(chain[0].keep_neurons[layer])
        assert plan.keep_neurons[layer] == sorted(plan.keep_neurons[layer]) and len(plan.keep_neurons[layer]) == 64
    # the composed plan, the chain and the step-by-step models give the same pruned model
    composed, chained = prune_in_memory(model, plan, ModelConfig()), prune_in_memory(model, chain, ModelConfig())
    two_step = prune_in_memory(stepwise[0], chain[1], ModelConfig())
    for a, b, c in zip(composed.parameters(), chained.parameters(), two_step.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert stepwise[1] is None
    assert PrunePlan.from_json(plan.to_json()) == plan


# ------------------------------------------------------------------------------------------------
# Head folding


def test_fold_heads_merges_pruned_heads_into_kept_heads_of_their_group(tiny):
    model, arch, _ = tiny
    scores = _scores(arch)
    # 8 heads in 4 groups of 2 -> 4 heads (1 per group)
    target = target_shape(arch, ExportConfigShape(num_attention_heads=4), tp=1, hf_export=False)
    plain, folded = build_plan(arch, target, scores), build_plan(arch, target, scores, fold_heads=True)
    assert plain.fold_heads == {} and plain.keep_heads == folded.keep_heads
    n, hd = 2, arch.kv_channels
    for layer in range(arch.num_layers):  # every pruned head goes to the one kept head of its group
        assert folded.fold_heads[layer] == {k: [k ^ 1] for k in folded.keep_heads[layer]}
    # mirror pairing: pruned heads by importance (3, 4, 0) go to kept heads from the least important (2, 1, 2)
    assert fold_assignment(torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2]), [0], [1, 2], 5) == {1: [4], 2: [0, 3]}

    full = gather_full_state(model, arch.vocab_size)
    a, b = prune_state(full, plain), prune_state(full, folded)
    assert PrunePlan.from_json(folded.to_json()) == folded
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed == {f"decoder.layers.{i}.self_attention.{m}.weight"
                       for i in range(4) for m in ("linear_qkv", "linear_proj")}
    for layer in range(arch.num_layers):
        qkv = full[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"]
        proj = full[f"decoder.layers.{layer}.self_attention.linear_proj.weight"]
        new_qkv = b[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"]
        new_proj = b[f"decoder.layers.{layer}.self_attention.linear_proj.weight"]
        ch = torch.tensor(folded.keep_channels)
        for slot, k in enumerate(folded.keep_heads[layer]):  # kept head k sits in group slot `slot`, q first
            p = k ^ 1
            def q_rows(h):  # head h's q rows in the source layout [q_1..q_n, k, v] per group
                start = (h // n) * (n + 2) * hd + (h % n) * hd
                return slice(start, start + hd)
            want_q = qkv[q_rows(k)] + (qkv[q_rows(p)] - qkv[q_rows(k)])
            got = new_qkv[slot * 3 * hd:(slot * 3 + 1) * hd]  # pruned layout: [q, k, v] per group
            assert torch.allclose(got, want_q[:, ch])
            assert torch.equal(new_qkv[(slot * 3 + 1) * hd:(slot * 3 + 3) * hd],  # k and v untouched
                               qkv[(k // n) * (n + 2) * hd + n * hd:(k // n + 1) * (n + 2) * hd][:, ch])
            want_o = proj[:, k * hd:(k + 1) * hd] + (proj[:, p * hd:(p + 1) * hd] - proj[:, k * hd:(k + 1) * hd])
            assert torch.allclose(new_proj[:, slot * hd:(slot + 1) * hd], want_o[ch])
    # proj_sum: only linear_proj changes, by adding the pruned heads' columns
    summed = prune_state(full, build_plan(arch, target, scores, fold_heads="proj_sum"))
    assert {k for k in a if not torch.equal(a[k], summed[k])} == {
        f"decoder.layers.{i}.self_attention.linear_proj.weight" for i in range(4)}
    with pytest.raises(MegaslimError, match="unknown head folding mode"):
        build_plan(arch, target, scores, fold_heads="bogus")


def test_fold_mode_defaults_to_proj_sum_and_old_plans_load_as_written(tiny, tmp_path):
    _, arch, _ = tiny
    target = target_shape(arch, ExportConfigShape(num_attention_heads=4), tp=1, hf_export=False)
    plain = build_plan(arch, target, _scores(arch))
    assert plain.fold_mode == "proj_sum" == _keep_all_plan(arch).fold_mode  # as the config's prune.fold_mode
    assert build_plan(arch, target, _scores(arch), fold_heads="proj_sum").fold_mode == "proj_sum"
    assert build_plan(arch, target, _scores(arch), fold_heads="laco").fold_mode == "laco"
    # a plan written before the fold_mode key existed folded the laco way: it loads as laco
    folded = json.loads(build_plan(arch, target, _scores(arch), fold_heads="laco").to_json())
    del folded["fold_mode"]
    (tmp_path / "old_plan.json").write_text(json.dumps(folded))
    old = PrunePlan.load(tmp_path / "old_plan.json")
    assert old.fold_mode == "laco" and old.fold_heads
    assert old == build_plan(arch, target, _scores(arch), fold_heads="laco")
    # and one written with the key loads exactly as written, whatever the default
    assert PrunePlan.from_json(plain.to_json()) == plain
    assert PrunePlan.from_json(json.dumps({**folded, "fold_mode": "laco"})).fold_mode == "laco"


@pytest.mark.dist
def test_launcher_iterative_and_fold_at_tp2_written_at_pp2(tiny_llama_tok, tmp_path):
    text = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
    data = [f"data.eval_path={text}", f"data.calib_path={text}", "importance.num_samples=8"]
    out = _prune(tmp_path, tiny_llama_tok, "iter", 2, 1, 1, 2, *data, "prune.iterative=2", "prune.fold_heads=true")
    chain = [PrunePlan.from_json(json.dumps(p)) for p in json.loads((out / "prune_plan_steps.json").read_text())]
    summary = json.loads((out / "prune.json").read_text())
    assert len(chain) == 2 and summary["iterative"] == 2 and summary["fold_heads"] and len(summary["steps"]) == 2
    assert "loss" in summary["steps"][0] and (out / "importance_step1.safetensors").is_file()
    plan = PrunePlan.load(out / "prune_plan.json")
    assert plan.target_arch == chain[-1].target_arch and plan.target_arch.hidden_size == 48
    assert (out / "hf" / "config.json").is_file()
    # refused before anything is computed: iterative needs the source at PP=1
    proc = torchrun(ROOT / "launch" / "prune.py", f"model.load={tiny_llama_tok}", f"output_dir={tmp_path / 'bad'}",
                    "parallel.pipeline_model_parallel_size=2", "prune.iterative=2", *PRUNE_ARGS, *data,
                    nproc=2, timeout=120, check=False)
    assert proc.returncode != 0 and "needs parallel.pipeline_model_parallel_size=1" in proc.stdout + proc.stderr
    assert not (tmp_path / "bad" / "checkpoint").exists()

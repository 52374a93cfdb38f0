"""Mixture-of-experts importance and pruning: expert scores (REAP, L2, routing frequency, per-expert neurons)
equal a plain computation on the HF model and are identical at EP=2 / PP=2; dropping an expert equals masking
its router logit; a keep-all permutation of experts and their neurons reproduces the logits; a pruned MoE
exports to an HF model transformers loads with matching logits."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from dist_utils import torchrun
from moe_tiny import VOCAB, make_tiny_moe
from transformers import AutoModelForCausalLM

from megaslim.config import ExportConfigShape, ImportanceConfig, ModelConfig
from megaslim.errors import MegaslimError
from megaslim.importance.calibrate import activation_scores
from megaslim.importance.scores import ImportanceScores
from megaslim.model.hf import HFReader
from megaslim.prune.plan import PrunePlan, build_plan, target_shape

FAMS = ("qwen2_moe", "mixtral")  # softmax over all experts (no renormalising) | over the top-k


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("moep")
    return {fam: make_tiny_moe(root / fam, fam, seed=7 + i) for i, fam in enumerate(FAMS)}


@pytest.fixture(scope="module")
def rows():
    torch.manual_seed(2)
    return torch.randint(0, VOCAB, (5, 17))  # 5 rows in micro-batches of 2: the last one is padded


@pytest.fixture(scope="module")
def loaded(sources, megatron_tp1):
    from megaslim.sources import load_model

    return {fam: load_model(ModelConfig(load=str(p)))[:2] for fam, p in sources.items()}


@pytest.fixture(scope="module")
def scores(loaded, rows):
    return {fam: activation_scores(m, a, rows, ImportanceConfig(), micro_batch_size=2)
            for fam, (m, a) in loaded.items()}


def _logits(model, tokens):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None)[..., :VOCAB]


def _hf_expert_reference(src, arch, tokens):
    """REAP / L2 / frequency per layer and expert, computed directly on the HF model and its weights."""
    hf, rd = AutoModelForCausalLM.from_pretrained(str(src)).eval(), HFReader(src)
    xs = {}
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, a, o, i=i: xs.__setitem__(i, o))
             for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        hf(tokens)
    for h in hooks:
        h.remove()
    block, (g, u, d) = ("block_sparse_moe", ("w1", "w3", "w2")) if arch.family == "mixtral" else \
        ("mlp", ("gate_proj", "up_proj", "down_proj"))
    E, out = arch.num_moe_experts, torch.zeros(3, arch.num_layers, arch.num_moe_experts)
    for i in range(arch.num_layers):
        x = xs[i].reshape(-1, arch.hidden_size)
        w, idx = torch.softmax(x @ rd.get(f"model.layers.{i}.{block}.gate.weight").T, -1).topk(2, -1)
        if not arch.moe_router_pre_softmax:
            w = w / w.sum(-1, keepdim=True)
        for e in range(E):
            def weight(n, e=e, i=i):
                return rd.get(f"model.layers.{i}.{block}.experts.{e}.{n}.weight")
            f = (F.silu(x @ weight(g).T) * (x @ weight(u).T)) @ weight(d).T
            routed = (idx == e).any(-1)
            norm = f[routed].norm(dim=-1)
            out[:, i, e] = torch.stack([((w * (idx == e)).sum(-1)[routed] * norm).sum(), norm.pow(2).sum().sqrt(),
                                        routed.sum() / x.shape[0]])
    return out


@pytest.mark.parametrize("family", FAMS)
def test_expert_scores_equal_a_plain_computation_on_the_hf_model(sources, loaded, scores, rows, family):
    arch, sc = loaded[family][1], scores[family]
    ref = _hf_expert_reference(sources[family], arch, rows[:, :-1])
    for k, name in enumerate(("expert_reap", "expert_l2", "expert_frequency")):
        torch.testing.assert_close(sc[name].float(), ref[k], rtol=1e-5, atol=1e-6, msg=name)
    assert sc["expert_neurons"].shape == (arch.num_layers, arch.num_moe_experts, arch.moe_ffn_hidden_size)
    routed = sc["expert_frequency"] > 0
    assert torch.equal(sc["expert_neurons"].sum(-1) > 0, routed)  # neurons scored over routed tokens only
    assert torch.allclose(sc["expert_frequency"].sum(-1), torch.full((arch.num_layers,), 2.0, dtype=torch.float64))
    if family == "qwen2_moe":  # the shared expert's neurons: mean over each sample's tokens, then L2 over samples
        ref = _hf_shared_reference(sources[family], arch, rows)
        torch.testing.assert_close(sc["shared_expert_neurons"].float(), ref, rtol=1e-5, atol=1e-7)
    else:
        assert "shared_expert_neurons" not in sc


def _hf_shared_reference(src, arch, rows):
    hf, rd, out = AutoModelForCausalLM.from_pretrained(str(src)).eval(), HFReader(src), []
    xs = {}
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, a, o, i=i: xs.__setitem__(i, o))
             for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        hf(rows[:, :-1])
    for h in hooks:
        h.remove()
    for i in range(arch.num_layers):
        def weight(n, i=i):
            return rd.get(f"model.layers.{i}.mlp.shared_expert.{n}.weight")
        a = F.silu(xs[i] @ weight("gate_proj").T) * (xs[i] @ weight("up_proj").T)  # [b, s, ffn]
        out.append(a.abs().mean(1).pow(2).sum(0).sqrt())
    return torch.stack(out)


def _perm_plan(arch, g):
    """A keep-all plan with experts, their neurons and hidden channels in random order."""
    L, E, f = arch.num_layers, arch.num_moe_experts, arch.moe_ffn_hidden_size
    return PrunePlan(
        source=arch.to_dict(), target=arch.to_dict(), keep_layers=list(range(L)),
        keep_channels=torch.randperm(arch.hidden_size, generator=g).tolist(),
        keep_groups={i: list(range(arch.num_query_groups)) for i in range(L)},
        keep_heads={i: list(range(arch.num_attention_heads)) for i in range(L)},
        keep_neurons={i: list(range(arch.ffn_hidden_size)) for i in range(L)},
        keep_experts={i: torch.randperm(E, generator=g).tolist() for i in range(L)},
        keep_shared_neurons={i: torch.randperm(arch.moe_shared_expert_intermediate_size, generator=g).tolist()
                             for i in range(L)} if arch.moe_shared_expert_intermediate_size else {},
        keep_expert_neurons={i: {e: torch.randperm(f, generator=g).tolist() for e in range(E)} for i in range(L)})


@pytest.mark.parametrize("family", FAMS)
def test_keep_all_permutation_of_experts_reproduces_logits(loaded, rows, family):
    from megaslim.prune.apply import prune_in_memory

    model, arch = loaded[family]
    plan = PrunePlan.from_json(_perm_plan(arch, torch.Generator().manual_seed(3)).to_json())  # JSON round trip
    assert plan.keep_experts[0] != sorted(plan.keep_experts[0])
    pruned = prune_in_memory(model, plan, ModelConfig())
    torch.testing.assert_close(_logits(pruned, rows[:, :-1]), _logits(model, rows[:, :-1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["least", "most"])
@pytest.mark.parametrize("family", FAMS)
def test_dropping_an_expert_equals_masking_its_router_logit(loaded, scores, rows, family, which):
    """Routing over the kept experts is routing over all of them with the dropped one's logit at -inf: for a
    never-routed expert (the least routed one of some layer) and for the most routed one alike."""
    from megaslim.prune.apply import prune_in_memory

    model, arch = loaded[family]
    freq = scores[family]["expert_frequency"]
    pick = freq.argmin if which == "least" else freq.argmax
    drop = {i: int(pick(-1)[i]) for i in range(arch.num_layers)}
    if which == "least" and family == "qwen2_moe":
        assert (freq.min(-1).values == 0).any(), "want a never-routed expert"
    keep = {i: [e for e in range(4) if e != drop[i]] for i in range(arch.num_layers)}
    plan = _perm_plan(arch, torch.Generator().manual_seed(0))
    all_neurons = list(range(arch.moe_ffn_hidden_size))
    plan = replace(plan, target=replace(arch, num_moe_experts=3).to_dict(), keep_channels=list(range(arch.hidden_size)),
                   keep_shared_neurons={},
                   keep_experts=keep, keep_expert_neurons={i: {e: all_neurons for e in keep[i]} for i in keep})
    pruned = prune_in_memory(model, plan, ModelConfig())
    handles = []
    for layer in model.decoder.layers:
        router, e = layer.mlp.router, drop[layer.layer_number - 1]
        gating = router.gating
        router.gating = lambda x, gating=gating, e=e: gating(x).index_fill(-1, torch.tensor([e]), float("-inf"))
        handles.append((router, gating))
    try:
        masked = _logits(model, rows[:, :-1])
    finally:
        for router, gating in handles:
            router.gating = gating
    torch.testing.assert_close(_logits(pruned, rows[:, :-1]), masked, rtol=0, atol=1e-5)
    if which == "most":
        assert (masked - _logits(model, rows[:, :-1])).abs().max() > 1e-4  # mattered: 10x the tolerance above


@pytest.mark.parametrize("family", FAMS)
def test_pruned_experts_export_to_hf_with_matching_logits(loaded, scores, rows, tmp_path, family):
    from megaslim.model.hf import arch_from_hf_config, export_hf, read_hf_config
    from megaslim.prune.apply import prune_in_memory

    model, arch = loaded[family]
    shared = 12 if arch.moe_shared_expert_intermediate_size else None  # Qwen2-MoE's shared expert: 24 -> 12
    target = target_shape(arch, ExportConfigShape(num_moe_experts=2, moe_ffn_hidden_size=8, hidden_size=24,
                                                  moe_shared_expert_intermediate_size=shared), tp=1, hf_export=True)
    imp = ImportanceScores(**scores[family])
    plan = build_plan(arch, target, imp, expert_metric="reap")
    for i in range(arch.num_layers):  # the two experts of highest REAP score, each its 8 best neurons
        assert plan.keep_experts[i] == sorted(imp.expert_reap[i].argsort(descending=True)[:2].tolist())
        e = plan.keep_experts[i][0]
        assert plan.keep_expert_neurons[i][e] == sorted(imp.expert_neurons[i, e].argsort(descending=True)[:8].tolist())
        if shared:
            best = imp.shared_expert_neurons[i].argsort(descending=True)[:12]
            assert plan.keep_shared_neurons[i] == sorted(best.tolist())
    pruned = prune_in_memory(model, plan, ModelConfig())
    export_hf(pruned, plan.target_arch, tmp_path / "hf", tokenizer_dir=None)
    assert arch_from_hf_config(read_hf_config(tmp_path / "hf")) == plan.target_arch
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert sum(p.numel() for p in hf.parameters()) == plan.target_arch.num_params()
    with torch.no_grad():
        ref = hf(rows[:, :-1]).logits
    torch.testing.assert_close(_logits(pruned, rows[:, :-1]), ref, rtol=0, atol=1e-4)
    freq = build_plan(arch, target, imp, expert_metric="frequency").keep_experts
    assert all(freq[i] == sorted(imp.expert_frequency[i].argsort(descending=True)[:2].tolist()) for i in freq)


def test_expert_targets_are_checked(loaded):
    arch = loaded["mixtral"][1]
    with pytest.raises(MegaslimError, match=r"num_moe_experts=1 must be between the router's top-k \(2"):
        target_shape(arch, ExportConfigShape(num_moe_experts=1), tp=1, hf_export=False)
    with pytest.raises(MegaslimError, match="has no dense MLP; set prune.export_config.moe_ffn_hidden_size"):
        target_shape(arch, ExportConfigShape(ffn_hidden_size=16), tp=1, hf_export=False)
    with pytest.raises(MegaslimError, match="moe_ffn_hidden_size=9 is not divisible by TP=2"):
        target_shape(arch, ExportConfigShape(moe_ffn_hidden_size=9), tp=2, hf_export=False)
    dense = replace(arch, num_moe_experts=None, moe_ffn_hidden_size=None, family="mistral")
    with pytest.raises(MegaslimError, match="need a mixture-of-experts model"):
        target_shape(dense, ExportConfigShape(num_moe_experts=2), tp=1, hf_export=False)
    with pytest.raises(MegaslimError, match="pruning experts needs expert importance scores"):
        build_plan(arch, replace(arch, num_moe_experts=2), None)


@pytest.mark.dist
@pytest.mark.parametrize("tp, pp, ep, nproc", [(1, 1, 2, 2), (1, 2, 1, 2), (2, 1, 1, 2), (2, 1, 2, 4)])
def test_expert_scores_are_identical_at_ep2_pp2_tp2_and_tp2xep2(sources, scores, rows, tmp_path, tp, pp, ep,
                                                                 nproc):
    torch.save(rows, tmp_path / "rows.pt")
    torchrun("moe_importance.py", sources["qwen2_moe"], tp, pp, ep, tmp_path / "rows.pt", tmp_path / "s.pt",
             nproc=nproc)
    got, ref = torch.load(tmp_path / "s.pt"), scores["qwen2_moe"]
    for k in ("expert_reap", "expert_l2", "expert_frequency", "expert_weight", "expert_neurons",
              "shared_expert_neurons", "heads", "channels"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-9, msg=k)


@pytest.mark.dist
def test_a_data_parallel_rank_without_calibration_rows_still_joins_the_expert_exchange(loaded, sources, rows,
                                                                                       tmp_path):
    """One row at EP=2 (DP=2): rank 1 has no row but must run the MoE layers' token exchange with rank 0."""
    model, arch = loaded["qwen2_moe"]
    ref = activation_scores(model, arch, rows[:1], ImportanceConfig(), micro_batch_size=2)
    torch.save(rows[:1], tmp_path / "rows.pt")
    torchrun("moe_importance.py", sources["qwen2_moe"], 1, 1, 2, tmp_path / "rows.pt", tmp_path / "s.pt",
             nproc=2, timeout=240)
    got = torch.load(tmp_path / "s.pt")
    for k in ("expert_reap", "expert_frequency", "expert_neurons", "heads"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-9, msg=k)


@pytest.mark.dist
@pytest.mark.parametrize("tp, ep, ttp", [(1, 2, 0), (1, 1, 2)])  # scored and written at EP=2; written at TP=2
def test_pruned_at_ep2_or_written_at_tp2_equals_pruned_in_one_process(loaded, scores, rows, tmp_path, sources,
                                                                    tp, ep, ttp):
    from megaslim.model.hf import export_hf
    from megaslim.prune.apply import prune_in_memory

    model, arch = loaded["qwen2_moe"]
    target = target_shape(arch, ExportConfigShape(num_moe_experts=2, moe_ffn_hidden_size=8), tp=1, hf_export=True)
    plan = build_plan(arch, target, ImportanceScores(**scores["qwen2_moe"]))
    export_hf(prune_in_memory(model, plan, ModelConfig()), plan.target_arch, tmp_path / "ref", tokenizer_dir=None)
    torch.save(rows, tmp_path / "rows.pt")
    torchrun("moe_prune.py", sources["qwen2_moe"], tp, 1, ep, tmp_path / "rows.pt", 2, 8, ttp, tmp_path / "scratch",
             tmp_path / "got", nproc=2)
    a, b = HFReader(tmp_path / "ref"), HFReader(tmp_path / "got")
    assert a.keys() == b.keys() and "model.layers.1.mlp.experts.1.down_proj.weight" in a.keys()
    for k in a.keys():
        assert torch.equal(a.get(k), b.get(k)), k


def test_expert_scores_are_saved_and_plotted(loaded, scores, tmp_path):
    from megaslim.importance.plots import plot_importance

    arch = loaded["qwen2_moe"][1]
    imp = ImportanceScores(**scores["qwen2_moe"])
    loaded_back = ImportanceScores.load(imp.save(tmp_path / "s.safetensors"), arch)
    assert torch.equal(loaded_back.expert_neurons, imp.expert_neurons.float())
    with pytest.raises(MegaslimError, match="expert_reap"):
        ImportanceScores.load(tmp_path / "s.safetensors", replace(arch, num_moe_experts=8))
    assert (tmp_path / "importance_experts.png") in plot_importance(imp, tmp_path)


@pytest.mark.dist
def test_launch_prune_keeps_experts_and_exports_hf(tmp_path):
    import json

    from dist_utils import ROOT

    src = make_tiny_moe(tmp_path / "src", "qwen3_moe", tokenizer=True)
    text, out = ROOT / "tests" / "data" / "hamlet_excerpt.txt", tmp_path / "run"
    torchrun(ROOT / "launch" / "prune.py", f"model.load={src}", f"output_dir={out}", f"data.calib_path={text}",
             f"data.eval_path={text}", "data.seq_length=32", "importance.num_samples=8", "eval.num_samples=2",
             "prune.export_config.num_moe_experts=2", "prune.export_config.moe_ffn_hidden_size=8",
             f"export.hf_dir={tmp_path / 'hf'}", nproc=1)
    plan = PrunePlan.load(out / "prune_plan.json")
    assert all(len(v) == 2 for v in plan.keep_experts.values()) and (out / "importance_experts.png").is_file()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert hf.config.num_experts == 2 and hf.config.moe_intermediate_size == 8
    assert json.loads((out / "prune.json").read_text())  # the run's summary was written

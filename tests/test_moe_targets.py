"""Targets for mixtures of experts: exact total / active parameter counts from published configs, forward
FLOPs through the top-k experts, `prune.target_active_params` and the MoE axes of the shape search (top-k,
TP and EP respected, `hparams_to_skip`), its config refusals, the dry-run planner, and the search end to end."""
import json
import math
from dataclasses import replace

import pytest
import torch
from dist_utils import ROOT, torchrun
from moe_tiny import make_tiny_moe

from megaslim.commands import plan as planner
from megaslim.commands.plan import PlanError, PlannerOptions
from megaslim.commands.planning import distill_memory, expert_params_rank, stage_params_rank
from megaslim.config import ConfigError, ExportConfigShape, SearchConfig, load_config
from megaslim.errors import MegaslimError
from megaslim.model.arch import ModelArch
from megaslim.model.hf import arch_from_hf_config
from megaslim.prune.plan import flops_per_token, target_shape
from megaslim.prune.search import Budget, candidates, enumerate_shapes

# The published config.json of mistralai/Mixtral-8x7B-v0.1 and Qwen/Qwen3-30B-A3B (typed in: no download)
MIXTRAL = {"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
           "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
           "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
           "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
           "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02,
           "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000}
QWEN3 = {"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
         "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
         "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
         "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
         "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
         "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
         "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
         "use_sliding_window": False, "vocab_size": 151936}
# A Qwen2-MoE-like shape with a gated shared expert, small enough to enumerate quickly
SHARED = ModelArch(num_layers=8, hidden_size=256, ffn_hidden_size=512, num_attention_heads=8, num_query_groups=4,
                   kv_channels=32, vocab_size=1000, qkv_bias=True, family="qwen2_moe", num_moe_experts=8,
                   moe_router_topk=2, moe_ffn_hidden_size=128, moe_shared_expert_intermediate_size=256,
                   moe_shared_expert_gate=True)


def _within(value: float, published: float, rel: float = 0.005) -> bool:
    return abs(value - published) <= rel * published


def test_published_moe_counts_from_their_configs():
    mix, qwen = arch_from_hf_config(dict(MIXTRAL)), arch_from_hf_config(dict(QWEN3))
    assert (mix.num_params(), mix.num_active_params()) == (46_702_792_704, 12_879_925_248)
    assert (qwen.num_params(), qwen.num_active_params()) == (30_532_122_624, 3_353_032_704)
    # Mistral: 46.7B total, 12.9B per token
    assert _within(mix.num_params(), 46.7e9) and _within(mix.num_active_params(), 12.9e9)
    # Qwen: 30.5B total, 29.9B non-embedding, "3.3B activated". The exact active count is 3.353B, 1.6% above
    # 3.3: Qwen's model card truncates to one decimal (30.53 -> 30.5, 29.91 -> 29.9, 3.353 -> 3.3)
    non_embedding = qwen.num_params() - 2 * qwen.vocab_size * qwen.hidden_size
    assert _within(qwen.num_params(), 30.5e9) and _within(non_embedding, 29.9e9)
    assert math.floor(qwen.num_active_params() / 1e8) / 10 == 3.3
    assert not _within(qwen.num_active_params(), 3.3e9) and _within(qwen.num_active_params(), 3.35e9)


@pytest.mark.parametrize("config", [MIXTRAL, QWEN3], ids=["mixtral", "qwen3_moe"])
def test_counts_equal_the_transformers_model_layer_for_layer(config):
    """The real widths on 2 layers (the count is linear in layers): total = transformers' parameter count on
    the meta device; active = total less the (experts - top-k) unused experts' tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    small = {**config, "num_hidden_layers": 2, "max_window_layers": 2}
    hf_cfg = AutoConfig.for_model(small.pop("model_type"), **{k: v for k, v in small.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    arch = arch_from_hf_config({**config, "num_hidden_layers": 2})
    assert arch.num_params() == total
    E, k = arch.num_moe_experts, arch.moe_router_topk
    assert arch.num_active_params() == total - experts * (E - k) // E


@pytest.mark.parametrize("arch", [arch_from_hf_config(dict(MIXTRAL)), arch_from_hf_config(dict(QWEN3)), SHARED],
                         ids=["mixtral", "qwen3_moe", "shared_expert"])
def test_flops_run_through_the_active_experts(arch):
    """Forward FLOPs = 2 x every weight one token multiplies (active parameters less the input embedding
    lookup and the norms) + the attention scores: the top-k experts, the shared expert and its gate, the router."""
    s = 4096
    q = arch.num_attention_heads * arch.kv_channels
    norms = arch.num_layers * (2 * arch.hidden_size + (2 * arch.kv_channels if arch.qk_layernorm else 0)
                               + (q + 2 * arch.num_query_groups * arch.kv_channels if arch.qkv_bias else 0))
    matmul = arch.num_active_params() - arch.vocab_size * arch.hidden_size - norms - arch.hidden_size
    assert flops_per_token(arch, s) == 2 * matmul + arch.num_layers * 4 * s * q
    dense = replace(arch, num_moe_experts=None)  # counted as dense, the experts' width would not matter
    assert flops_per_token(arch, s) != flops_per_token(dense, s)


def test_search_under_an_active_budget():
    s = SearchConfig(top_k=6, max_width_pruning=0.5)
    budget = Budget(0.8 * SHARED.num_active_params(), active=True)
    cands = candidates(SHARED, budget, s)
    assert len(cands) == 6
    every = enumerate_shapes(SHARED, s)
    assert all(a.num_active_params() <= budget.value for a in cands)
    actives = [a.num_active_params() for a in cands]
    assert actives == sorted(actives, reverse=True)
    # nearest the budget: no shape left out lies between it and the chosen ones
    worst = min(actives)
    assert not [a for a in every if worst < a.num_active_params() <= budget.value and a not in cands]
    # the MoE axes are searched: experts 8..4 (>= top-k 2), expert and shared FFNs in multiples of 8
    assert {a.num_moe_experts for a in every} == {8, 7, 6, 5, 4}
    assert {a.moe_ffn_hidden_size for a in every} == {128 * k // 20 // 8 * 8 for k in range(10, 21)}
    assert {a.moe_shared_expert_intermediate_size for a in every} == {256 * k // 20 // 8 * 8 for k in range(10, 21)}
    # a total budget reaches for the experts too: the nearest shapes drop some
    total = candidates(SHARED, 0.8 * SHARED.num_params(), s)
    assert all(a.num_params() <= 0.8 * SHARED.num_params() for a in total)
    assert any(a.num_moe_experts < 8 for a in total)


def test_candidates_are_what_the_explicit_targets_give():
    """Every searched MoE shape equals prune.export_config's for the same sizes (build_plan takes either)."""
    mix = replace(arch_from_hf_config(dict(MIXTRAL)), num_layers=4, vocab_size=1000)
    for a in candidates(mix, Budget(0.7 * mix.num_active_params(), active=True), SearchConfig(top_k=4)) + \
            candidates(SHARED, 0.7 * SHARED.num_params(), SearchConfig(top_k=4)):
        src = mix if a.family == "mixtral" else SHARED
        want = ExportConfigShape(hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
                                 num_layers=a.num_layers, num_moe_experts=a.num_moe_experts,
                                 moe_ffn_hidden_size=a.moe_ffn_hidden_size,
                                 moe_shared_expert_intermediate_size=a.moe_shared_expert_intermediate_size)
        assert target_shape(src, want, tp=1, hf_export=True) == a
        if a.family == "mixtral":  # Mixtral's intermediate_size is the experts' width
            assert a.ffn_hidden_size == a.moe_ffn_hidden_size


def test_moe_axes_respect_skips_top_k_tp_and_ep():
    s = SearchConfig(max_width_pruning=0.5, hparams_to_skip=["num_moe_experts", "moe_shared_expert_intermediate_size"])
    shapes = enumerate_shapes(SHARED, s)
    assert {a.num_moe_experts for a in shapes} == {8}
    assert {a.moe_shared_expert_intermediate_size for a in shapes} == {256}
    assert len({a.moe_ffn_hidden_size for a in shapes}) > 1
    skip_ffn = enumerate_shapes(SHARED, SearchConfig(hparams_to_skip=["moe_ffn_hidden_size"]))
    assert {a.moe_ffn_hidden_size for a in skip_ffn} == {128}
    # experts divide EP; never fewer than the router's top-k
    wide = SearchConfig(max_width_pruning=0.9, hparams_to_skip=["num_layers", "hidden_size", "num_attention_heads",
                                                                "moe_ffn_hidden_size",
                                                                "moe_shared_expert_intermediate_size"])
    assert {a.num_moe_experts for a in enumerate_shapes(SHARED, wide, ep=2)} == {8, 6, 4, 2}
    assert {a.num_moe_experts for a in enumerate_shapes(replace(SHARED, moe_router_topk=3), wide, ep=1)} \
        == {8, 7, 6, 5, 4, 3}
    # both TP sizes (the run's and prune.target_tensor_model_parallel_size) split every expert FFN
    for a in enumerate_shapes(SHARED, SearchConfig(max_width_pruning=0.5), tps=(1, 4)):
        assert a.moe_ffn_hidden_size % 8 == 0 and a.moe_shared_expert_intermediate_size % 8 == 0
        assert a.num_attention_heads % 4 == 0
    with pytest.raises(MegaslimError, match=r"no shape valid at TP \(1,\), PP 1, EP 3"):
        candidates(SHARED, 0.9 * SHARED.num_params(), SearchConfig(hparams_to_skip=["num_moe_experts"]), ep=3)


def test_active_budget_refusals_name_the_key():
    s = SearchConfig()
    with pytest.raises(MegaslimError, match=r"prune.target_active_params=.* is not below the source model's "
                                            r"[\d,]+ active parameters"):
        candidates(SHARED, Budget(SHARED.num_active_params(), active=True), s)
    smallest = min(a.num_active_params() for a in enumerate_shapes(SHARED, s))
    with pytest.raises(MegaslimError, match="prune.target_active_params=.* is below the smallest shape"):
        candidates(SHARED, Budget(smallest - 1, active=True), s)
    # a total budget above the source's active count still prunes: the keys count different things
    assert candidates(SHARED, Budget(SHARED.num_params() - 1), s)


def test_dense_active_budget_is_the_total_budget():
    """ModelOpt's active_params of a dense model is its parameter count: the same search."""
    dense = ModelArch(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
                      kv_channels=64, vocab_size=49152, tie_word_embeddings=True)
    assert dense.num_active_params() == dense.num_params()
    s = SearchConfig(top_k=5)
    budget = 0.8 * dense.num_params()
    assert candidates(dense, Budget(budget, active=True), s) == candidates(dense, budget, s)


def _refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_takes_one_budget_and_the_moe_axes():
    _refused(["prune.target_params=1e6", "prune.target_active_params=1e6"],
             "set either prune.target_params (all parameters) or prune.target_active_params")
    _refused(["prune.target_active_params=0"], "prune.target_active_params=0.0 must be > 0")
    _refused(["prune.target_active_params=-5"], "prune.target_active_params=-5.0 must be > 0")
    _refused(["prune.target_active_params=1e6", "prune.export_config.num_moe_experts=2"],
             "prune.target_active_params searches the shape itself; unset prune.export_config.num_moe_experts")
    _refused(["prune.target_active_params=1e6", "parallel.pipeline_model_parallel_size=2"],
             "prune.target_active_params prunes every candidate in memory")
    _refused(["prune.target_active_params=1e6", "prune.layer_metric=block_loss"],
             "scores one depth; prune.target_active_params tries several")
    _refused(["prune.search.hparams_to_skip=[num_experts]"], "hparams_to_skip")
    cfg = load_config(None, ["prune.target_active_params=3e9", "prune.search.hparams_to_skip=[num_moe_experts,"
                             "moe_ffn_hidden_size,moe_shared_expert_intermediate_size]"])
    assert Budget.of(cfg.prune) == Budget(3e9, active=True)
    assert [str(a) for a in cfg.prune.search.hparams_to_skip] == [
        "num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"]
    from megaslim.config import validate_compress, validate_prune

    validate_prune(cfg)  # a budget is something to prune
    with pytest.raises(ConfigError, match="prune.target_active_params searches one round's shape; unset compress"):
        validate_compress(load_config(None, ["prune.target_active_params=3e9", "compress.rounds=[{hidden_size: 48}]"]))


# -- the dry-run planner -----------------------------------------------------------------------------------


def _hf_config(tmp_path, config) -> str:
    path = tmp_path / f"{config['model_type']}.json"
    path.write_text(json.dumps(config))
    return str(path)


def _quiet():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


def test_dry_run_prints_active_and_total_params(tmp_path):
    cfg = load_config(None, ["prune.target_active_params=2.5e9", "parallel.expert_model_parallel_size=8",
                             "model.params_dtype=bfloat16", "train.global_batch_size=64"])
    console = _quiet()
    p = planner.dry_run(cfg, PlannerOptions(hf_config=_hf_config(tmp_path, QWEN3)), console=console,
                        json_path=tmp_path / "plan.json")
    teacher, prune = p.stage("teacher"), p.stage("round 1 prune")
    assert (teacher.params, teacher.active_params) == (30_532_122_624, 3_353_032_704)
    assert prune.active_params <= 2.5e9 < teacher.active_params and prune.params < teacher.params
    assert teacher.flops == flops_per_token(arch_from_hf_config(dict(QWEN3)), cfg.data.seq_length)
    text = console.file.getvalue()
    assert "30.53 B (3.35 B active)" in text and "active parameters" in text and "128 experts (top-8)" in text
    stages = json.loads((tmp_path / "plan.json").read_text())["stages"]
    assert stages[0]["active_params"] == 3_353_032_704 and stages[1]["active_params"] == prune.active_params
    # experts split over EP=8: the GPU holds 16 of the 128 experts of each layer
    arch = arch_from_hf_config(dict(QWEN3))
    per_expert = 3 * arch.hidden_size * arch.moe_ffn_hidden_size * arch.num_layers
    assert stage_params_rank(arch, tp=1, pp=1, stage=0, divisible_by=128, ep=1) - \
        stage_params_rank(arch, tp=1, pp=1, stage=0, divisible_by=128, ep=8) == (128 - 16) * per_expert
    # the distributed optimizer shards experts over the expert-data-parallel group (DP 8 / EP 8 = 1)
    cfg16 = load_config(None, ["model.params_dtype=bfloat16"])
    _, parts = distill_memory(cfg16, arch, arch, tp=1, pp=1, dp=8, micro=1, flash=True, overhead=0, ep=8)
    p_e = expert_params_rank(arch, tp=1, pp=1, ep=8)
    assert p_e * 8 == expert_params_rank(arch, tp=1, pp=1, ep=1) == 128 * per_expert
    assert parts["optimizer state"] == (parts["params_rank"] - p_e) * 12 / 8 + p_e * 12
    # a dense model's plan has no active figures
    dense = planner.plan(load_config(None, ["prune.target_active_params=100e6"]), PlannerOptions())
    assert dense.stage("teacher").active_params is None and dense.stage("round 1 prune").params <= 100e6


def test_dry_run_refuses_what_the_search_cannot_reach(tmp_path):
    hf = _hf_config(tmp_path, MIXTRAL)
    with pytest.raises(PlanError, match="prune.target_active_params=1,000,000 is below the smallest shape"):
        planner.plan(load_config(None, ["prune.target_active_params=1e6"]), PlannerOptions(hf_config=hf))
    # 8 experts do not split over EP=3 (8 GPUs: DP 8 is not a multiple of 3 either, so use 6 GPUs)
    with pytest.raises(PlanError, match="num_moe_experts=8 is not divisible by EP=3"):
        planner.plan(load_config(None, ["parallel.expert_model_parallel_size=3", "train.global_batch_size=24"]),
                     PlannerOptions(hf_config=hf, gpus_per_node=6))


# -- end to end ------------------------------------------------------------------------------------------


@pytest.mark.dist
def test_launch_prune_searches_an_active_budget(tmp_path):
    src = make_tiny_moe(tmp_path / "src", "qwen3_moe", tokenizer=True)
    from megaslim.sources import resolve_source, source_arch

    arch = source_arch(resolve_source(str(src)))
    budget = math.floor(0.85 * arch.num_active_params())
    text, out = ROOT / "tests" / "data" / "hamlet_excerpt.txt", tmp_path / "run"
    torchrun(ROOT / "launch" / "prune.py", f"model.load={src}", f"output_dir={out}", f"data.calib_path={text}",
             f"data.eval_path={text}", "data.seq_length=32", "importance.num_samples=8", "eval.num_samples=2",
             f"prune.target_active_params={budget}", "prune.search.top_k=3", "prune.search.train_iters=0",
             "prune.search.max_width_pruning=0.5", "prune.search.hparams_to_skip=[num_layers]", nproc=1)
    search = json.loads((out / "search.json").read_text())
    assert search["target_active_params"] == budget and search["target_params"] is None
    ranking = search["ranking"]
    want = candidates(arch, Budget(budget, active=True), SearchConfig(max_width_pruning=0.5, top_k=3,
                                                                      hparams_to_skip=["num_layers"]))
    assert sorted(r["active_params"] for r in ranking) == sorted(a.num_active_params() for a in want)
    assert [r["pruned_loss"] for r in ranking] == sorted(r["pruned_loss"] for r in ranking)
    for r in ranking:
        assert r["active_params"] <= budget and r["num_layers"] == arch.num_layers
        assert arch.moe_router_topk <= r["num_moe_experts"] <= arch.num_moe_experts
    prune = json.loads((out / "prune.json").read_text())
    assert prune["active_params_after"] == ranking[0]["active_params"] <= budget
    plan = json.loads((out / "prune_plan.json").read_text())
    assert plan["target"]["num_moe_experts"] == ranking[0]["num_moe_experts"]
    assert all(len(v) == ranking[0]["num_moe_experts"] for v in plan["keep_experts"].values())

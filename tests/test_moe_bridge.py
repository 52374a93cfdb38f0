"""Mixtures of experts (Mixtral, Qwen3-MoE, Qwen2-MoE) through the HF bridge: logits match transformers at
TP=1, TP=2, EP=2, PP=2, HF -> megatron -> HF is exact, router settings come from config.json, and routing
megaslim would not reproduce is refused by name."""
from dataclasses import replace

import pytest
import torch
from dist_utils import torchrun
from moe_tiny import FAMILIES, VOCAB, make_tiny_moe
from tiny import hf_logits, save_random_tokens
from transformers import AutoConfig, AutoModelForCausalLM

from megaslim.config import ModelConfig
from megaslim.errors import MegaslimError
from megaslim.model.arch import ModelArch, check_parallel_layout
from megaslim.model.hf import HFReader, arch_from_hf_config, hf_config_dict, read_hf_config
from megaslim.model.hf_weights import check_hf_weights
from megaslim.runtime.layout import ParallelLayout, check_layout


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {fam: make_tiny_moe(root / fam, fam, seed=i) for i, fam in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return save_random_tokens(tmp_path_factory.mktemp("tok") / "tokens.pt", VOCAB, (2, 16))


def _assert_same_weights(src, export):
    a, b = HFReader(src), HFReader(export)
    assert a.keys() == b.keys()
    for k in a.keys():
        assert torch.equal(a.get(k), b.get(k)), k
    assert arch_from_hf_config(read_hf_config(export)) == arch_from_hf_config(read_hf_config(src))


def test_arch_reads_router_settings_and_counts_params(sources):
    archs = {fam: arch_from_hf_config(read_hf_config(p)) for fam, p in sources.items()}
    mix, q3, q2 = archs["mixtral"], archs["qwen3_moe"], archs["qwen2_moe"]
    assert (mix.num_moe_experts, mix.moe_router_topk, mix.moe_ffn_hidden_size) == (4, 2, 32)
    assert not mix.moe_router_pre_softmax and not q3.moe_router_pre_softmax  # top-k renormalised
    assert q2.moe_router_pre_softmax  # norm_topk_prob=false: softmax over all experts, no renormalising
    assert q3.qk_layernorm and q3.moe_ffn_hidden_size == 16 and q3.moe_shared_expert_intermediate_size is None
    assert (q2.moe_shared_expert_intermediate_size, q2.moe_shared_expert_gate, q2.qkv_bias) == (24, True, True)
    assert all(a.moe_aux_loss_coeff == 0.001 and a.moe_router_score_function == "softmax" for a in archs.values())
    for fam, arch in archs.items():
        hf = AutoModelForCausalLM.from_pretrained(str(sources[fam]))
        assert arch.num_params() == sum(p.numel() for p in hf.parameters()), fam
        per_expert = 3 * arch.hidden_size * arch.moe_ffn_hidden_size * arch.num_layers
        assert arch.num_params() - arch.num_active_params() == 2 * per_expert  # 4 experts, 2 active
        assert ModelArch.from_dict(arch.to_dict()) == arch
    dense = replace(mix, num_moe_experts=None, moe_ffn_hidden_size=None, moe_aux_loss_coeff=0.0, family="llama")
    assert not any(k.startswith("moe_") or k == "num_moe_experts" for k in dense.to_dict())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp1_logits_match_hf_and_roundtrip_is_exact(sources, tokens, tmp_path, megatron_tp1, family):
    from megaslim.model.hf import export_hf
    from megaslim.sources import load_model

    src, toks = sources[family], torch.load(tokens)
    model, arch, source = load_model(ModelConfig(load=str(src)))
    pos = torch.arange(toks.shape[1]).unsqueeze(0).expand_as(toks)
    with torch.no_grad():
        logits = model(toks, pos, None)[..., :VOCAB]
    assert (logits - hf_logits(src, toks)).abs().max().item() < 1e-4
    export_hf(model, arch, tmp_path / "export", tokenizer_dir=None, source=str(src))
    _assert_same_weights(src, tmp_path / "export")
    assert (hf_logits(tmp_path / "export", toks) - logits).abs().max().item() < 1e-4


@pytest.mark.dist
@pytest.mark.parametrize("family, tp, pp, ep", [
    ("qwen3_moe", 2, 1, 1), ("qwen2_moe", 2, 1, 1),  # experts and shared expert split over TP
    ("mixtral", 1, 1, 2), ("qwen2_moe", 1, 1, 2),  # two whole experts per EP rank
    ("qwen3_moe", 1, 2, 1), ("mixtral", 1, 2, 1),  # one MoE layer per stage (tied embeddings: mixtral)
])
def test_logits_match_hf_and_roundtrip_is_exact(sources, tokens, tmp_path, family, tp, pp, ep):
    src, out, export = sources[family], tmp_path / "logits.pt", tmp_path / "export"
    torchrun("forward_logits.py", src, tp, pp, tokens, out, export, "--ep", ep, nproc=tp * pp * ep)
    assert (torch.load(out) - hf_logits(src, torch.load(tokens))).abs().max().item() < 1e-4
    _assert_same_weights(src, export)


def _cfg(family, **kw):
    base = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
                num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=256)
    return AutoConfig.for_model(family, **{**base, **kw}).to_dict()


@pytest.mark.parametrize("family, kw, needle", [
    ("qwen3_moe", dict(n_group=2, topk_group=1), r"n_group=2 \(grouped top-k routing"),
    ("mixtral", dict(scoring_func="sigmoid"), r"scoring_func='sigmoid' \(a router score function"),
    ("qwen3_moe", dict(routed_scaling_factor=2.5), "routed_scaling_factor=2.5"),
    ("qwen3_moe", dict(mlp_only_layers=[0]), r"mlp_only_layers=\[0\] \(dense"),
    ("qwen2_moe", dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
    ("mixtral", dict(router_jitter_noise=0.1), "router_jitter_noise=0.1"),
    ("qwen2_moe", dict(shared_expert_intermediate_size=0), "without a shared expert"),
    ("qwen2_moe", dict(qkv_bias=False), "qkv_bias=false"),
    ("mixtral", dict(num_local_experts=2, num_experts_per_tok=3), "num_experts_per_tok=3 must be between 1 and"),
    ("llama", dict(num_experts=4), "mixture-of-experts models are not supported for llama"),
])
def test_unsupported_routing_is_refused_by_name(family, kw, needle):
    with pytest.raises(MegaslimError, match=needle):
        arch_from_hf_config(_cfg(family, **kw))


def test_layouts_that_split_experts_badly_are_refused(sources):
    arch = arch_from_hf_config(read_hf_config(sources["qwen2_moe"]))  # 4 experts of 16, shared expert 24
    check_parallel_layout(arch, 2, 2, 4)
    with pytest.raises(MegaslimError, match="num_moe_experts=4 is not divisible by EP=3"):
        check_parallel_layout(arch, 1, 1, 3)
    with pytest.raises(MegaslimError, match="moe_shared_expert_intermediate_size=24 is not divisible by TP=16"):
        check_parallel_layout(replace(arch, num_attention_heads=16, num_query_groups=16), 16, 1)
    dense = replace(arch, num_moe_experts=None, moe_ffn_hidden_size=None, moe_shared_expert_intermediate_size=None)
    with pytest.raises(MegaslimError, match="EP=2 needs a mixture-of-experts model"):
        check_parallel_layout(dense, 1, 1, 2)
    assert check_layout(8, 2, 1, 4) == 4 and ParallelLayout.build(1, 1, world_size=4, ep=2).ep == 2
    with pytest.raises(MegaslimError, match="EP=4 does not divide the data-parallel size 2"):
        check_layout(4, 2, 1, 4)


def test_export_refuses_what_the_family_cannot_express(sources):
    arch = arch_from_hf_config(read_hf_config(sources["mixtral"]))
    with pytest.raises(MegaslimError, match="moe_router_pre_softmax"):
        hf_config_dict(replace(arch, moe_router_pre_softmax=True))  # Mixtral always renormalises
    with pytest.raises(MegaslimError, match="moe_shared_expert_intermediate_size"):
        hf_config_dict(replace(arch, moe_shared_expert_intermediate_size=8))
    with pytest.raises(MegaslimError, match="num_moe_experts"):
        hf_config_dict(replace(arch, family="mistral"))


def test_weights_with_another_expert_count_are_refused(sources):
    arch = arch_from_hf_config(read_hf_config(sources["qwen3_moe"]))
    with pytest.raises(MegaslimError, match="4 experts in the weights, 8 in config.json"):
        check_hf_weights(sources["qwen3_moe"], replace(arch, num_moe_experts=8))
    with pytest.raises(MegaslimError, match=r"down_proj.weight \[32, 16\] \(config.json implies \[32, 8\]"):
        check_hf_weights(sources["qwen3_moe"], replace(arch, moe_ffn_hidden_size=8))


@pytest.mark.dist
def test_checkpoint_saved_at_ep2_reloads_at_ep1_and_tp2_exactly(sources, tokens, tmp_path, megatron_tp1):
    from megaslim.checkpoint import read_meta
    from megaslim.model.hf import export_hf
    from megaslim.sources import load_model

    src, root, toks = sources["qwen2_moe"], tmp_path / "ckpt", torch.load(tokens)
    torchrun("forward_logits.py", src, 1, 1, tokens, tmp_path / "ep2.pt", "-", "--ep", 2, "--save", root, nproc=2)
    assert read_meta(root)["saved_with"]["expert_model_parallel_size"] == 2

    model, arch, _ = load_model(ModelConfig(load=str(root)))  # EP=1 in this process: all four experts here
    assert len(model.decoder.layers[0].mlp.experts.local_experts) == 4
    export_hf(model, arch, tmp_path / "ep1", tokenizer_dir=None)
    _assert_same_weights(src, tmp_path / "ep1")

    torchrun("forward_logits.py", root, 2, 1, tokens, tmp_path / "tp2.pt", tmp_path / "tp2", nproc=2)
    _assert_same_weights(src, tmp_path / "tp2")
    ref = hf_logits(src, toks)
    for out in ("ep2.pt", "tp2.pt"):
        assert (torch.load(tmp_path / out) - ref).abs().max().item() < 1e-4, out

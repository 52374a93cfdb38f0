"""More architectures: Mistral, Qwen2, Qwen3 and Nemotron as tiny random models built from their transformers
config classes: logits match HF at TP=1/TP=2, HF -> megatron -> HF is exact, importance and pruning cover
what each adds (QKV bias, QK-norm, non-gated squared-ReLU MLP, LayerNorm1P), and unconvertible configs are
refused by name."""
import json
from dataclasses import replace

import pytest
import torch
from dist_utils import torchrun
from tiny import hf_logits, make_tiny_llama, save_random_tokens
from transformers import AutoConfig, AutoModelForCausalLM

from megaslim.config import ExportConfigShape, ImportanceConfig, ModelConfig
from megaslim.errors import MegaslimError
from megaslim.model.hf import HFReader, arch_from_hf_config, hf_config_dict, hf_fetcher, read_hf_config

VOCAB = 250
ARCHS = {  # what each family adds, made to matter
    "mistral": dict(tie=False, head_dim=16),  # explicit head_dim != hidden / heads; window 4096 >= context
    "qwen2": dict(tie=False, random_biases=True),  # QKV bias
    "qwen3": dict(tie=True, head_dim=16),  # QK layernorm, explicit head_dim
    "nemotron": dict(tie=False),  # squared ReLU non-gated MLP, LayerNorm1P with bias, partial rotary 0.5
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):

    root = tmp_path_factory.mktemp("archs")
    return {fam: make_tiny_llama(root / fam, family=fam, vocab=VOCAB, seed=i, **kw)
            for i, (fam, kw) in enumerate(ARCHS.items())}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return save_random_tokens(tmp_path_factory.mktemp("tok") / "tokens.pt", VOCAB, (2, 20))


def _megatron_logits(model, tokens):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None)[..., :VOCAB]


def test_arch_reads_what_each_family_adds(sources):
    archs = {fam: arch_from_hf_config(read_hf_config(p)) for fam, p in sources.items()}
    assert archs["mistral"].kv_channels == 16 and archs["qwen3"].kv_channels == 16
    assert archs["qwen2"].qkv_bias and not archs["mistral"].qkv_bias
    assert archs["qwen3"].qk_layernorm and archs["qwen3"].tie_word_embeddings
    nem = archs["nemotron"]
    assert (nem.gated, nem.activation, nem.normalization, nem.rotary_percent) == (False, "relu2", "LayerNorm1P", 0.5)
    # new fields are written only when they differ from the Llama defaults (older saved archs still compare)
    assert "gated" not in archs["qwen2"].to_dict() and nem.to_dict()["gated"] is False
    for fam, arch in archs.items():
        hf = AutoModelForCausalLM.from_pretrained(str(sources[fam]))
        assert arch.num_params() == sum(p.numel() for p in hf.parameters()), fam


@pytest.mark.dist
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", list(ARCHS))
def test_logits_match_hf_and_roundtrip_is_exact(sources, tokens, tmp_path, family, tp):
    src, out, export = sources[family], tmp_path / "logits.pt", tmp_path / "export"
    torchrun("forward_logits.py", src, tp, 1, tokens, out, export, nproc=tp)
    assert (torch.load(out) - hf_logits(src, torch.load(tokens))).abs().max().item() < 1e-5

    a, b = HFReader(src), HFReader(export)
    assert a.keys() == b.keys()
    for k in a.keys():
        assert torch.equal(a.get(k), b.get(k)), k
    assert arch_from_hf_config(read_hf_config(export)) == arch_from_hf_config(read_hf_config(src))


def _perm_plan(arch, g):
    from megaslim.prune.plan import PrunePlan

    perm = lambda n: torch.randperm(n, generator=g).tolist()  # noqa: E731
    L, n = arch.num_layers, arch.heads_per_group
    groups = {i: perm(arch.num_query_groups) for i in range(L)}
    return PrunePlan(source=arch.to_dict(), target=arch.to_dict(), keep_layers=list(range(L)),
                     keep_channels=perm(arch.hidden_size), keep_groups=groups,
                     keep_heads={i: [grp * n + j for grp in groups[i] for j in perm(n)] for i in range(L)},
                     keep_neurons={i: perm(arch.ffn_hidden_size) for i in range(L)})


@pytest.mark.parametrize("family", list(ARCHS))
def test_prune_width_and_depth_exports_an_hf_model_matching_megatron(sources, tokens, tmp_path, family,
                                                                      megatron_tp1):
    from megaslim.importance.calibrate import compute_importance
    from megaslim.model.hf import export_hf
    from megaslim.prune.apply import prune_in_memory
    from megaslim.prune.plan import build_plan, target_shape
    from megaslim.sources import load_model

    model, arch, _ = load_model(ModelConfig(load=str(sources[family])))
    toks = torch.load(tokens)
    assert (_megatron_logits(model, toks) - hf_logits(sources[family], toks)).abs().max().item() < 1e-5

    # a keep-all random permutation of heads, groups, neurons and channels reproduces the logits: every
    # tensor carrying a dimension (QKV bias, LayerNorm bias, non-gated fc1 rows) moves with it
    permuted = prune_in_memory(model, _perm_plan(arch, torch.Generator().manual_seed(2)), ModelConfig())
    assert (_megatron_logits(permuted, toks) - _megatron_logits(model, toks)).abs().max().item() < 1e-5

    torch.manual_seed(3)
    rows = torch.randint(0, VOCAB, (4, 17))
    signal = "fc1_output" if family == "nemotron" else "fc2_input"
    scores, _ = compute_importance(model, arch, rows, ImportanceConfig(neuron_signal=signal), micro_batch_size=2,
                                   transformer_impl="local")
    target = target_shape(arch, ExportConfigShape(hidden_size=48, ffn_hidden_size=96, num_attention_heads=4,
                                                  num_query_groups=2, num_layers=3), tp=1, hf_export=True)
    plan = build_plan(arch, target, scores)
    pruned = prune_in_memory(model, plan, ModelConfig())
    export_hf(pruned, plan.target_arch, tmp_path / "hf", tokenizer_dir=None, source=family)

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    c = hf.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim) == (family, 3, 48, 96, 4, 2, arch.kv_channels)
    with torch.no_grad():
        ref = hf(toks).logits
    assert (ref - _megatron_logits(pruned, toks)).abs().max().item() < 1e-5
    assert plan.target_arch.num_params() == sum(p.numel() for p in hf.parameters())


@pytest.mark.dist
def test_nemotron_scores_match_plain_hooks_on_the_hf_model_and_tp2(sources, tmp_path, megatron_tp1):
    """fc1_output of a non-gated MLP is |X W1^T| (all of fc1), channels the LayerNorm1P outputs: the same
    numbers from plain hooks on transformers' NemotronForCausalLM, and from megaslim at TP=2."""
    from megaslim.importance.calibrate import compute_importance
    from megaslim.importance.scores import ImportanceScores
    from megaslim.sources import load_model

    model, arch, _ = load_model(ModelConfig(load=str(sources["nemotron"])))
    torch.manual_seed(4)
    rows = torch.randint(0, VOCAB, (3, 13))
    torch.save(rows, tmp_path / "rows.pt")
    scores, _ = compute_importance(model, arch, rows, ImportanceConfig(neuron_signal="fc1_output"),
                                   micro_batch_size=2, transformer_impl="local")
    torchrun("importance_scores.py", sources["nemotron"], 2, 1, tmp_path / "rows.pt", 2, tmp_path / "tp2.safetensors",
             "neuron_signal=fc1_output", nproc=2)
    tp2 = ImportanceScores.load(tmp_path / "tp2.safetensors")
    for name in ("heads", "neurons", "channels", "layer_bi"):
        assert torch.allclose(getattr(tp2, name), getattr(scores, name).float(), rtol=1e-5, atol=1e-6), name

    hf = AutoModelForCausalLM.from_pretrained(str(sources["nemotron"])).eval()
    seen: dict[str, list] = {}
    norms = {f"{i}.{n}": getattr(layer, n) for i, layer in enumerate(hf.model.layers)
             for n in ("input_layernorm", "post_attention_layernorm")}
    norms["final"] = hf.model.norm
    mods = {**norms, **{f"up.{i}": layer.mlp.up_proj for i, layer in enumerate(hf.model.layers)}}
    handles = [m.register_forward_hook(lambda _m, _a, out, k=k: seen.setdefault(k, []).append(out.detach()))
               for k, m in mods.items()]
    try:
        with torch.no_grad():
            hf(rows[:, :-1])
    finally:
        for h in handles:
            h.remove()

    def l2_of_means(k):  # seq_agg=mean per sample, then batch_agg=l2 over samples
        return seen[k][0].abs().mean(1).pow(2).sum(0).sqrt()

    for i in range(arch.num_layers):
        assert torch.allclose(scores.neurons[i].float(), l2_of_means(f"up.{i}"), rtol=1e-4, atol=1e-6)
    channels = sum(l2_of_means(k) for k in norms)
    assert torch.allclose(scores.channels.float(), channels, rtol=1e-4, atol=1e-6)


def test_non_gated_layouts_hooks_and_slicing():
    from megaslim.importance.hooks import CalibContext, NeuronHook
    from megaslim.importance.stats import SampleStats
    from megaslim.model.layout import Layout, layout_of

    assert layout_of("decoder.layers.0.mlp.linear_fc1.weight", gated=False) is Layout.COLUMN
    assert layout_of("decoder.layers.0.mlp.linear_fc1.weight") is Layout.GATED
    for name in ("layers.1.input_layernorm.bias", "layers.1.pre_mlp_layernorm.bias", "final_layernorm.bias",
                 "layers.1.self_attention.linear_qkv.layer_norm_bias", "layers.1.mlp.linear_fc1.layer_norm_bias",
                 "layers.1.self_attention.q_layernorm.weight"):
        assert layout_of(f"decoder.{name}", gated=False) is Layout.REPLICATED, name
    assert layout_of("decoder.layers.1.self_attention.linear_qkv.bias") is Layout.COLUMN

    class FC1(torch.nn.Module):
        def forward(self, x):
            return x, None

    mlp = torch.nn.Module()
    mlp.linear_fc1, mlp.linear_fc2 = FC1(), torch.nn.Identity()
    hook = NeuronHook(mlp, CalibContext(), 0, ffn_local=3, signal="fc1_output", seq_agg="mean", gated=False)
    mlp.linear_fc1(torch.tensor([[[10.0, -20.0, 2.0]]]))  # every fc1 output is a neuron
    assert SampleStats.finalize(hook.stats.packed(), "mean").tolist() == [10.0, 20.0, 2.0]
    with pytest.raises(ValueError, match="gated=False"):
        mlp.linear_fc1(torch.zeros(1, 1, 6))


# ------------------------------------------------------------------------------------------------
# Bad input: refused by name, never a silently wrong model


def _cfg(family, **kw):
    base = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=128,
                num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=256)
    return AutoConfig.for_model(family, **{**base, **kw}).to_dict()


@pytest.mark.parametrize("family, kw, needle", [
    ("llama", dict(num_experts=4), r"mixture-of-experts .*num_experts"),
    ("qwen2_moe", dict(num_experts=4, n_group=2, topk_group=1), r"n_group=2 \(grouped top-k routing"),
    ("mistral", dict(sliding_window=16), r"sliding-window attention \(sliding_window=16 < max_position_embeddings=256"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1), "sliding-window attention"),
    ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
     "rope_type='yarn' is not supported"),
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type='linear'"),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 128}), "llama3 RoPE scaling with"),
    ("llama", dict(attention_bias=True), "attention_bias=true"),
    ("llama", dict(mlp_bias=True), "mlp_bias=true"),
    ("qwen3", dict(attention_bias=True), "attention_bias=true"),
    ("nemotron", dict(mlp_bias=True), "mlp_bias=true"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("nemotron", dict(hidden_act="silu"), "hidden_act='silu' for nemotron"),
    ("llama", dict(partial_rotary_factor=0.5), "partial rotary"),
    ("gemma", dict(), "unsupported architecture model_type='gemma'"),
])
def test_unconvertible_configs_are_refused(family, kw, needle):
    with pytest.raises(MegaslimError, match=needle):
        arch_from_hf_config(_cfg(family, **kw))


@pytest.mark.parametrize("family, kw", [
    ("mistral", dict(sliding_window=4096)),  # a window no shorter than the context changes nothing
    ("mistral", dict(sliding_window=None)),
    ("qwen2", dict(use_sliding_window=False, sliding_window=16)),  # Qwen2.5 configs carry an unused window
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
])
def test_harmless_settings_are_accepted(family, kw):
    arch_from_hf_config(_cfg(family, **kw))


def test_tie_mismatch_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    def fetch(path, name="embedding.word_embeddings.weight"):
        arch = arch_from_hf_config(read_hf_config(path))
        return hf_fetcher(HFReader(path), arch)(name)

    tied = make_tiny_llama(tmp_path / "tied", layers=1, tie=True)
    w = load_file(tied / "model.safetensors")
    save_file({**w, "lm_head.weight": w["model.embed_tokens.weight"].clone()}, str(tied / "model.safetensors"))
    fetch(tied)  # an equal copy of the embedding is fine
    save_file({**w, "lm_head.weight": torch.randn_like(w["model.embed_tokens.weight"])},
              str(tied / "model.safetensors"))
    with pytest.raises(MegaslimError, match="tie_word_embeddings=true but lm_head.weight differs"):
        fetch(tied)

    untied = make_tiny_llama(tmp_path / "untied", layers=1, tie=True)  # weights without lm_head ...
    cfg = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=False)))  # ... config untied
    with pytest.raises(MegaslimError, match="tie_word_embeddings=false but the weights hold no lm_head"):
        fetch(untied, "output_layer.weight")


def test_export_refuses_an_arch_its_family_cannot_express(sources):
    arch = arch_from_hf_config(read_hf_config(sources["mistral"]))
    hf_config_dict(arch)
    with pytest.raises(MegaslimError, match=r"cannot export as HF mistral: \{'qkv_bias': True\}"):
        hf_config_dict(replace(arch, qkv_bias=True))
    nem = arch_from_hf_config(read_hf_config(sources["nemotron"]))
    with pytest.raises(MegaslimError, match="cannot export as HF llama"):
        hf_config_dict(replace(nem, family="llama"))
    assert hf_config_dict(nem)["rope_parameters"]["partial_rotary_factor"] == 0.5

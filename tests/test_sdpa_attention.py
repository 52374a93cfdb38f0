"""model.core_attention=sdpa (torch's scaled_dot_product_attention in the local spec) against megatron's
own DotProductAttention: same logits and gradients (fp32, 1e-5) on GQA Llama, QK-norm Qwen3 and
LayerNorm1P Nemotron at TP=1, and at TP=2 / PP=2; decode-step and explicit-mask paths; dropout refused;
importance scores unchanged (head hooks read linear_proj's input, which stays). megaslim's one-op RoPE
(model/rope.py) equals megatron's bit for bit, alone and in a whole model's logits and gradients."""
from dataclasses import replace

import pytest
import torch
from dist_utils import torchrun

from megaslim.config import ImportanceConfig, ModelConfig

VOCAB = 250
FAMILIES = {"llama": dict(tie=True), "qwen3": dict(tie=True, head_dim=16), "nemotron": dict(tie=False)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("sdpa")
    return {fam: make_tiny_llama(root / fam, family=fam, vocab=VOCAB, seed=i, **kw)
            for i, (fam, kw) in enumerate(FAMILIES.items())}


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 20))


def _load(src, core_attention):
    from megaslim.sources import load_model

    return load_model(ModelConfig(load=str(src), core_attention=core_attention))


def _logits(model, toks):
    pos = torch.arange(toks.shape[1]).unsqueeze(0).expand_as(toks)
    return model(toks, pos, None)[..., :VOCAB]


def _cores(model):
    return {type(layer.self_attention.core_attention).__name__ for layer in model.decoder.layers}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_grads_match_megatron_attention(sources, tokens, family, megatron_tp1):
    local, _, _ = _load(sources[family], "local")
    sdpa, _, _ = _load(sources[family], "sdpa")
    assert _cores(local) == {"DotProductAttention"} and _cores(sdpa) == {"SDPAttention"}
    assert local.state_dict().keys() == sdpa.state_dict().keys()  # checkpoints are interchangeable
    with torch.no_grad():
        assert (_logits(sdpa, tokens) - _logits(local, tokens)).abs().max().item() < 1e-5
    for m in (local, sdpa):  # training mode: the backward through SDPA matches megatron's
        m.train()
        torch.nn.functional.log_softmax(_logits(m, tokens), -1).mean().backward()
    for (name, a), b in zip(local.named_parameters(), sdpa.parameters()):
        assert (a.grad - b.grad).abs().max().item() <= 1e-5 * max(1.0, a.grad.abs().max().item()), name


def _cores_pair(heads=8, groups=4, head_dim=16):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megaslim.model.sdpa_attention import SDPAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                            num_query_groups=groups, kv_channels=head_dim, use_cpu_initialization=True,
                            attention_dropout=0.0, masked_softmax_fusion=False)
    args = dict(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(**args), SDPAttention(**args), cfg


def test_core_matches_on_prefill_decode_and_explicit_mask(megatron_tp1):
    dpa, sdpa, _ = _cores_pair()
    torch.manual_seed(0)
    b, sk = 3, 7
    k, v = torch.randn(sk, b, 4, 16), torch.randn(sk, b, 4, 16)
    q_full, q_step = torch.randn(sk, b, 8, 16), torch.randn(1, b, 8, 16)
    mask = torch.rand(b, 1, sk, sk) < 0.3
    mask[..., 0] = False  # every query keeps one key (fully masked rows differ by design: -10000 vs -inf)
    for q, m in ((q_full, None), (q_step, None), (q_full, mask)):  # prefill, KV-cache decode step, mask
        ref, got = dpa(q, k, v, m), sdpa(q, k, v, m)
        assert got.shape == ref.shape == (q.shape[0], b, 128)
        assert (got - ref).abs().max().item() < 1e-5


def test_dropout_and_unsupported_configs_are_refused(megatron_tp1):
    from megatron.core.transformer.enums import AttnMaskType

    from megaslim.model.sdpa_attention import SDPAttention

    _, _, cfg = _cores_pair()
    args = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    with pytest.raises(ValueError, match="attention dropout"):
        SDPAttention(config=cfg, attention_dropout=0.1, **args)
    with pytest.raises(ValueError, match="attention dropout"):
        SDPAttention(config=replace(cfg, attention_dropout=0.1), **args)
    with pytest.raises(ValueError, match="causal"):
        SDPAttention(config=cfg, **{**args, "attn_mask_type": AttnMaskType.no_mask})


def test_importance_scores_unchanged(sources, megatron_tp1):
    from megaslim.importance.calibrate import compute_importance

    torch.manual_seed(3)
    rows = torch.randint(0, VOCAB, (4, 17))
    scores = {}
    for kind in ("local", "sdpa"):
        model, arch, _ = _load(sources["llama"], kind)
        scores[kind], _ = compute_importance(model, arch, rows, ImportanceConfig(), micro_batch_size=2,
                                             transformer_impl="local")
    for field in ("heads", "query_groups", "neurons", "channels", "layer_bi"):
        a, b = getattr(scores["local"], field), getattr(scores["sdpa"], field)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), field


def _freqs(seq, dim, base=10000.0):
    inv = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    f = torch.outer(torch.arange(seq).float(), inv)
    return torch.cat((f, f), -1)[:, None, None, :]  # megatron's layout: [s, 1, 1, rot_dim]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mscale", [1.0, 0.7])
def test_rope_equals_megatron_bit_for_bit(dtype, mscale):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megaslim.model.rope import apply_rotary

    torch.manual_seed(0)
    t = torch.randn(24, 2, 5, 16, dtype=dtype)[:, :, 1:4]  # a strided view, like megatron's key
    freqs = _freqs(24, 16)
    a, b = (t.detach().clone().requires_grad_() for _ in range(2))
    ref, got = _apply_rotary_pos_emb_bshd(a, freqs, mscale=mscale), apply_rotary(b, freqs, mscale)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    got.backward(grad)
    assert torch.equal(got, ref) and got.stride() == ref.stride()
    assert torch.equal(b.grad, a.grad)


def test_rope_routes_only_the_plain_case(megatron_tp1):
    from megatron.core.transformer import attention

    from megaslim.model.rope import install

    install()
    fast, original = attention.apply_rotary_pos_emb, attention.apply_rotary_pos_emb.original
    _, _, cfg = _cores_pair()
    torch.manual_seed(0)
    t = torch.randn(10, 2, 8, 16)
    for config, freqs in ((cfg, _freqs(10, 16)), (cfg, _freqs(10, 8)),  # plain; rotary_percent < 1
                          (replace(cfg, rotary_interleaved=True), _freqs(10, 16))):
        assert torch.equal(fast(t, freqs, config), original(t, freqs, config))


def test_model_with_fast_rope_equals_megatron_rope_bit_for_bit(sources, tokens, megatron_tp1):
    """The whole model (GQA Llama): logits and every gradient identical with megatron's RoPE swapped back."""
    from megatron.core.transformer import attention

    model, _, _ = _load(sources["llama"], "sdpa")
    model.train()
    fast = attention.apply_rotary_pos_emb
    runs = []
    for rope in (fast, fast.original):
        attention.apply_rotary_pos_emb = rope
        try:
            model.zero_grad(set_to_none=True)
            logits = _logits(model, tokens)
            torch.nn.functional.log_softmax(logits, -1).mean().backward()
        finally:
            attention.apply_rotary_pos_emb = fast
        runs.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.dist
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_logits_match_at_tp2_and_pp2(sources, tokens, tmp_path, tp, pp):
    torch.save(tokens, tmp_path / "tokens.pt")
    torchrun("sdpa_logits.py", sources["llama"], tp, pp, tmp_path / "tokens.pt", tmp_path / "out.pt", nproc=tp * pp)
    out = torch.load(tmp_path / "out.pt")
    assert (out["sdpa"] - out["local"]).abs().max().item() < 1e-5

"""Importance estimation: formulas by hand, hooks' hygiene, layout invariance, and SmolLM2 vs plain HF hooks."""
import math

import pytest
import torch
from dist_utils import torchrun

from megaslim.errors import MegaslimError
from megaslim.importance.hooks import BlockImportanceHook, CalibContext, HeadHook, NeuronHook, attach_hooks
from megaslim.importance.scores import ImportanceScores
from megaslim.importance.stats import SampleStats, seq_reduce

# Two samples, sequence 2, one feature: sample A has |a| = [1, 3], sample B has [2, 2]  ([s, b, n]).
MAGS = torch.tensor([[[1.0], [2.0]], [[3.0], [2.0]]])


@pytest.mark.parametrize("seq_agg, batch_agg, expected", [
    ("mean", "l2", math.sqrt(2 ** 2 + 2 ** 2)),
    ("mean", "mean", 2.0),
    ("mean", "var", 0.0),
    ("l2", "l2", math.sqrt(10 + 8)),
    ("l2", "mean", (math.sqrt(10) + math.sqrt(8)) / 2),
    ("var", "mean", (1.0 + 0.0) / 2),
    ("var", "var", 0.25),
    ("var", "l2", 1.0),
])
def test_aggregations_by_hand(seq_agg, batch_agg, expected):
    stats = SampleStats(1)
    stats.add(seq_reduce(MAGS, seq_agg))
    assert SampleStats.finalize(stats.packed(), batch_agg).item() == pytest.approx(expected)


def test_statistics_do_not_depend_on_the_split():
    torch.manual_seed(0)
    values = torch.rand(10, 5)
    whole, parts = SampleStats(5), [SampleStats(5), SampleStats(5)]
    whole.add(values)
    parts[0].add(values[:3])
    parts[1].add(values[3:])
    merged = parts[0].packed() + parts[1].packed()
    for agg in ("mean", "l2", "var"):
        assert torch.allclose(SampleStats.finalize(merged, agg), SampleStats.finalize(whole.packed(), agg))


def test_head_hook_is_l2_over_head_dim_and_skips_padded_rows():
    proj = torch.nn.Identity()
    ctx = CalibContext(valid=torch.tensor([True, False]))
    hook = HeadHook(proj, ctx, 0, heads=2, head_dim=2, seq_agg="mean")
    x = torch.zeros(1, 2, 4)  # [s, b, heads*head_dim]
    x[0, 0] = torch.tensor([3.0, 4.0, 0.0, 1.0])  # head 0 norm 5, head 1 norm 1
    x[0, 1] = 100.0  # a padded row: must not count
    proj(x)
    hook.remove()
    proj(x)  # removed hooks record nothing more
    assert hook.stats.count.item() == 1
    assert SampleStats.finalize(hook.stats.packed(), "l2").tolist() == [5.0, 1.0]


def test_fc1_output_signal_takes_the_up_half_of_each_shard():
    class FC1(torch.nn.Module):
        def forward(self, x):
            return x, None

    mlp = torch.nn.Module()
    mlp.linear_fc1, mlp.linear_fc2 = FC1(), torch.nn.Identity()
    hook = NeuronHook(mlp, CalibContext(), 0, ffn_local=2, signal="fc1_output", seq_agg="mean")
    mlp.linear_fc1(torch.tensor([[[10.0, 20.0, -1.0, 2.0]]]))  # [gate_r (2); up_r (2)]
    assert SampleStats.finalize(hook.stats.packed(), "mean").tolist() == [1.0, 2.0]


@pytest.mark.parametrize("sign, expected", [(1.0, 0.0), (-1.0, 2.0)])
def test_block_importance_is_one_minus_cosine(sign, expected):
    class Layer(torch.nn.Module):
        def forward(self, hidden_states):
            return sign * hidden_states, None

    layer = Layer()
    hook = BlockImportanceHook(layer, CalibContext(), 0)
    layer(hidden_states=torch.randn(3, 2, 4))
    total, count = hook.packed()
    assert count.item() == 6 and (total / count).item() == pytest.approx(expected)


def _all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_after_an_exception(tiny_llama, megatron_tp1):
    from megaslim.config import ModelConfig
    from megaslim.sources import load_model

    model, _, _ = load_model(ModelConfig(load=str(tiny_llama)))
    before = _all_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with attach_hooks(model, CalibContext(), seq_agg="mean", neuron_signal="fc2_input"):
            assert _all_hooks(model) > before
            raise RuntimeError("boom")
    assert _all_hooks(model) == before


def test_scores_of_another_shape_are_refused(tmp_path, tiny_llama):
    from megaslim.model.hf import arch_from_hf_config, read_hf_config

    arch = arch_from_hf_config(read_hf_config(tiny_llama))
    L, H = arch.num_layers, arch.num_attention_heads
    scores = ImportanceScores(heads=torch.rand(L, H), query_groups=torch.rand(L, 4),
                              neurons=torch.rand(L, 96), channels=torch.rand(64), layer_bi=torch.rand(L))
    scores.save(tmp_path / "s.safetensors")
    with pytest.raises(MegaslimError, match=r"another shape: neurons \(4, 96\) != \(4, 128\)"):
        ImportanceScores.load(tmp_path / "s.safetensors", arch)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MegaslimError, match="not a readable importance scores file"):
        ImportanceScores.load(tmp_path / "bad.safetensors")


NAMES = ("heads", "query_groups", "neurons", "channels", "layer_bi", "layer_loss")


def _close(a: ImportanceScores, b: ImportanceScores, rel: float):
    for n in NAMES:
        x, y = getattr(a, n), getattr(b, n)
        assert (x - y).abs().max().item() <= rel * y.abs().max().item() + 1e-7, n


@pytest.mark.dist
def test_scores_identical_at_any_layout_dp_split_and_micro_batch(tiny_llama, tmp_path):
    torch.manual_seed(0)
    rows = tmp_path / "rows.pt"
    torch.save(torch.randint(0, 250, (6, 33)), rows)
    results = {}
    # (tp, pp, nproc, micro_batch): single rank, TP2xPP2, TP=2, PP=2, and DP=2 with another micro-batch
    for tp, pp, n, mbs in [(1, 1, 1, 2), (2, 2, 4, 2), (2, 1, 2, 3), (1, 2, 2, 1), (1, 1, 2, 4)]:
        out = tmp_path / f"s{tp}{pp}{n}{mbs}.safetensors"
        torchrun("importance_scores.py", tiny_llama, tp, pp, rows, mbs, out, "layer_metrics=bi,loss", nproc=n)
        results[(tp, pp, n, mbs)] = ImportanceScores.load(out)
    base = results.pop((1, 1, 1, 2))
    assert base.heads.shape == (4, 8) and base.neurons.shape == (4, 128) and base.layer_loss.shape == (4,)
    assert torch.allclose(base.query_groups, base.heads.reshape(4, 4, 2).sum(-1))
    assert base.layer_bi.min() > 0 and base.heads.min() > 0
    for s in results.values():
        _close(s, base, 1e-5)


# ------------------------------------------------------------------------------------------------
# SmolLM2: megaslim's scores against independent plain hooks on the HF LlamaForCausalLM


def _hf_reference_scores(hf, rows):
    """seq_agg=mean, batch_agg=l2, neuron_signal=fc2_input, computed with plain hooks on HF modules."""
    cfg = hf.config
    L, H, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    sq = {"heads": torch.zeros(L, H, dtype=torch.float64),
          "neurons": torch.zeros(L, cfg.intermediate_size, dtype=torch.float64)}
    channel_sq = {}
    bi_sum = torch.zeros(L, dtype=torch.float64)
    handles = []

    def add(key, i, per_sample):  # per_sample [b, n]
        sq[key][i] += per_sample.double().pow(2).sum(0)

    def add_norm(name, out):
        v = out.abs().double().mean(1).pow(2).sum(0)  # [b, s, h] -> mean over s -> sum of squares over b
        channel_sq[name] = channel_sq.get(name, 0) + v

    for i, layer in enumerate(hf.model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: add("heads", i, a[0].reshape(*a[0].shape[:2], H, hd).norm(dim=-1).mean(1))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: add("neurons", i, a[0].abs().mean(1))))
        handles.append(layer.input_layernorm.register_forward_hook(lambda m, a, o, i=i: add_norm(f"in{i}", o)))
        handles.append(layer.post_attention_layernorm.register_forward_hook(
            lambda m, a, o, i=i: add_norm(f"post{i}", o)))

        def bi_hook(m, args, kwargs, out, i=i):
            hin = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            hout = out[0] if isinstance(out, tuple) else out
            bi_sum[i] += (1 - torch.nn.functional.cosine_similarity(hin.double(), hout.double(), dim=-1)).sum()
        handles.append(layer.register_forward_hook(bi_hook, with_kwargs=True))
    handles.append(hf.model.norm.register_forward_hook(lambda m, a, o: add_norm("final", o)))
    try:
        with torch.no_grad():
            hf(rows[:, :-1])
    finally:
        for h in handles:
            h.remove()
    ntok = rows[:, :-1].numel()
    return {"heads": sq["heads"].sqrt(), "neurons": sq["neurons"].sqrt(),
            "channels": sum(v.sqrt() for v in channel_sq.values()), "layer_bi": bi_sum / ntok}


@pytest.fixture(scope="module")
def smol_rows(smollm2_dir, tmp_path_factory):
    from pathlib import Path

    from transformers import AutoTokenizer

    from megaslim.data.packing import pack_rows, read_documents

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    text = Path(__file__).resolve().parent / "data" / "hamlet_excerpt.txt"
    rows = pack_rows(read_documents(text), tok, seq_length=64, num_rows=4)
    path = tmp_path_factory.mktemp("smolrows") / "rows.pt"
    torch.save(rows, path)
    return rows, path


@pytest.mark.slow
def test_smollm2_scores_match_plain_hf_hooks(smollm2_dir, smol_rows, megatron_tp1):
    from transformers import AutoModelForCausalLM

    from megaslim.config import ImportanceConfig, ModelConfig
    from megaslim.importance.calibrate import compute_importance
    from megaslim.sources import load_model

    rows, _ = smol_rows
    model, arch, _ = load_model(ModelConfig(load=str(smollm2_dir)))
    ours, cost = compute_importance(model, arch, rows, ImportanceConfig(), micro_batch_size=2,
                                    transformer_impl="local")
    assert cost["tokens"] == 4 * 64
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    ref = _hf_reference_scores(hf, rows)
    for name, r in ref.items():
        mine = getattr(ours, name)
        assert (mine - r).abs().max().item() <= 1e-4 * r.abs().max().item(), name


@pytest.mark.dist
@pytest.mark.slow
def test_smollm2_scores_equal_at_tp3_and_pp2(smollm2_dir, smol_rows, tmp_path):
    _, rows = smol_rows
    out = {}
    for tp, pp in [(1, 1), (3, 1), (1, 2)]:
        path = tmp_path / f"{tp}{pp}.safetensors"
        torchrun("importance_scores.py", smollm2_dir, tp, pp, rows, 2, path, nproc=tp * pp, timeout=600)
        out[(tp, pp)] = ImportanceScores.load(path)
    for key in [(3, 1), (1, 2)]:
        for n in NAMES[:-1]:
            x, y = getattr(out[key], n), getattr(out[(1, 1)], n)
            assert (x - y).abs().max().item() <= 1e-5 * y.abs().max().item(), (key, n)

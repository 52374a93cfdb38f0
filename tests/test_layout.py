import pytest
import torch

from megaslim.model.layout import Layout, layout_of, shard, unshard


@pytest.mark.parametrize("name, layout", [
    ("embedding.word_embeddings.weight", Layout.VOCAB),
    ("output_layer.weight", Layout.VOCAB),
    ("decoder.layers.3.self_attention.linear_qkv.weight", Layout.COLUMN),
    ("decoder.layers.3.self_attention.linear_proj.weight", Layout.ROW),
    ("decoder.layers.0.mlp.linear_fc1.weight", Layout.GATED),
    ("decoder.layers.0.mlp.linear_fc2.weight", Layout.ROW),
    ("decoder.layers.0.input_layernorm.weight", Layout.REPLICATED),
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", Layout.REPLICATED),
    ("decoder.final_layernorm.weight", Layout.REPLICATED),
])
def test_layout_table(name, layout):
    assert layout_of(name) is layout


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_unshard_roundtrip(layout, tp):
    full = torch.randn(16, 8)
    shards = [shard(full, layout, r, tp, padded_rows=20 if layout is Layout.VOCAB else None)
              for r in range(tp)]
    assert torch.equal(unshard(shards, layout, vocab_size=16), full)


def test_gated_shard_is_gate_then_up_per_rank():
    gate = torch.arange(8.0).unsqueeze(1)
    up = 100 + torch.arange(8.0).unsqueeze(1)
    s1 = shard(torch.cat([gate, up]), Layout.GATED, 1, 2)
    # rank 1 holds gate rows 4..7 then up rows 4..7, not a contiguous slice of [gate; up]
    assert s1.squeeze(1).tolist() == [4, 5, 6, 7, 104, 105, 106, 107]


def test_vocab_padding_rows_are_zero_and_stripped():
    full = torch.ones(10, 4)
    s = [shard(full, Layout.VOCAB, r, 2, padded_rows=12) for r in range(2)]
    assert s[1].shape == (6, 4) and s[1][-2:].abs().sum() == 0
    assert unshard(s, Layout.VOCAB, vocab_size=10).shape == (10, 4)

"""HF <-> megatron bridge on a tiny random Llama: logits and weights at TP=1, TP=2, TP2xPP2."""
import pytest
import torch
from dist_utils import torchrun
from transformers import AutoModelForCausalLM

from megaslim.model.hf import HFReader

pytestmark = pytest.mark.dist  # multi-process (torchrun over gloo)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tok") / "tokens.pt"
    torch.save(torch.randint(0, 250, (2, 24)), path)
    return path


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (2, 2)])
def test_logits_match_hf_and_roundtrip_is_exact(tiny_llama, tokens, tmp_path, tp, pp):
    out, export = tmp_path / "logits.pt", tmp_path / "export"
    torchrun("forward_logits.py", tiny_llama, tp, pp, tokens, out, export, nproc=tp * pp)

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    with torch.no_grad():
        ref = hf(torch.load(tokens)).logits
    assert (torch.load(out) - ref).abs().max().item() < 1e-4

    src, dst = HFReader(tiny_llama), HFReader(export)
    assert src.keys() == dst.keys()
    for k in src.keys():
        assert torch.equal(src.get(k), dst.get(k)), k
    assert AutoModelForCausalLM.from_pretrained(str(export)).config.head_dim == 8


def test_untied_qwen2_with_qkv_bias_matches_hf(tmp_path, tokens):
    from tiny import make_tiny_llama

    src = make_tiny_llama(tmp_path / "qwen2", family="qwen2", tie=False)
    with torch.no_grad():  # qwen2 inits biases to zero; make them matter
        m = AutoModelForCausalLM.from_pretrained(str(src))
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_()
        m.save_pretrained(str(src))
        ref = m.eval()(torch.load(tokens)).logits
    out = tmp_path / "logits.pt"
    torchrun("forward_logits.py", src, 2, 1, tokens, out, tmp_path / "export", nproc=2)
    assert (torch.load(out) - ref).abs().max().item() < 1e-4
    a, b = HFReader(src), HFReader(tmp_path / "export")
    assert a.keys() == b.keys() and "lm_head.weight" in b.keys()
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())

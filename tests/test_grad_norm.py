"""megatron's gradient norm (the metrics' `grad_norm`, and the norm `train.clip_grad` clips by) is the same at
every layout, and so are the weights a clipped step makes.

megatron counts a parameter in the norm on every TP rank only if it carries `tensor_model_parallel`; 0.16
sets that attribute only while initialising weights, which megaslim skips (weights are loaded), so
`build_gpt` sets it from the layout table (`megaslim.model.compat.mark_tensor_parallel_params`). Without it the
norm at TP=2 counted TP rank 0's shards only (0.035 instead of 0.043 here), and clipping scaled by it.
"""
import json

import pytest
from dist_utils import ROOT, torchrun

from megaslim.model.hf import HFReader

pytestmark = pytest.mark.dist  # multi-process (torchrun over gloo)

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
CLIP = 1e-6  # far below the norm (~0.04): clipping active, and small enough that Adam's eps makes the
#             update depend on the clip factor (Adam alone is nearly blind to a gradient's scale)


@pytest.fixture(scope="module")
def student(tiny_llama_tok, tmp_path_factory):
    """Another tiny Llama (same tokenizer, 2 layers, other weights): a student with non-zero KD gradients."""
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("gn_student") / "llama", tokenizer=True, seed=5, layers=2)


def _run(teacher, student, out, tp, pp):
    torchrun(ROOT / "launch" / "distill.py", f"model.load={teacher}", f"distill.student.load={student}",
             f"output_dir={out}", f"data.train_path={TEXT}", f"data.eval_path={TEXT}", "data.seq_length=32",
             "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3", "train.min_lr=3e-4",
             "train.warmup_iters=0", "train.train_iters=2", f"train.clip_grad={CLIP}", "eval.num_samples=2",
             "data.micro_batch_size=2", f"parallel.tensor_model_parallel_size={tp}",
             f"parallel.pipeline_model_parallel_size={pp}", f"export.hf_dir={out}/hf", nproc=tp * pp, timeout=300)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in rows if "grad_norm" in r}, HFReader(out / "hf")


def test_grad_norm_and_clipped_step_match_tp1_at_tp2_and_pp2(tiny_llama_tok, student, tmp_path):
    ref_norms, ref_w = _run(tiny_llama_tok, student, tmp_path / "tp1", 1, 1)
    assert sorted(ref_norms) == [1, 2] and all(n > 100 * CLIP for n in ref_norms.values())
    for tp, pp in [(2, 1), (1, 2)]:
        norms, w = _run(tiny_llama_tok, student, tmp_path / f"tp{tp}pp{pp}", tp, pp)
        for step in (1, 2):
            assert norms[step] == pytest.approx(ref_norms[step], rel=1e-5), (tp, pp, step)
        for k in ref_w.keys():
            assert (w.get(k) - ref_w.get(k)).abs().max().item() < 1e-5, (tp, pp, k)


def test_tensor_parallel_attributes_follow_the_layout_table(tiny_llama_tok, megatron_tp1):
    """Every TP-split weight of a loaded model is marked for megatron's optimizer (norm, zero count);
    replicated ones (norms) are not."""
    from megaslim.config import ModelConfig
    from megaslim.model.layout import Layout, layout_of
    from megaslim.sources import load_model

    model, _, _ = load_model(ModelConfig(load=str(tiny_llama_tok)))
    marked = 0
    for name, p in model.named_parameters():
        layout = layout_of(name, gated=model.config.gated_linear_unit)
        if layout is Layout.REPLICATED:
            assert not getattr(p, "tensor_model_parallel", False), name
        else:
            assert p.tensor_model_parallel and p.partition_stride == 1, name
            assert p.partition_dim == (1 if layout is Layout.ROW else 0), name
            marked += 1
    assert marked == 1 + 4 * 4  # embedding (tied output), per layer: qkv, proj, fc1, fc2

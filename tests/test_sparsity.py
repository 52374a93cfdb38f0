"""Unstructured and 2:4 sparsity (magnitude, Wanda): masks against direct references, TP=2 == TP=1,
masks in checkpoints, exact zeros through distillation (DP=2, distributed optimizer) and resume, and
bad input refused before compute."""
import json

import pytest
import torch
from dist_utils import ROOT, torchrun

from megaslim.errors import MegaslimError
from megaslim.sparsity.masks import nm_mask, unstructured_mask

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
NAMES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
SETTINGS = [("magnitude", "unstructured", 0.6), ("wanda", "unstructured", 0.5), ("wanda", "2:4", 0.5)]


# -- score -> mask ---------------------------------------------------------------------------------


def test_mask_rules():
    torch.manual_seed(0)
    s = torch.rand(6, 12)
    row = unstructured_mask(s, 0.3, group="row")  # floor(12 * 0.3) = 3 zeros per row, the 3 smallest
    assert (row.sum(1) == 9).all()
    assert torch.equal(row, s > s.sort(1).values[:, 2:3])
    layer = unstructured_mask(s, 0.3, group="layer")  # floor(72 * 0.3) = 21 zeros in the whole matrix
    assert layer.sum() == 72 - 21 and torch.equal(layer, s > s.flatten().kthvalue(21).values)
    nm = nm_mask(s)
    groups, kept = s.view(6, 3, 4), nm.view(6, 3, 4)
    assert (kept.sum(-1) == 2).all()
    assert torch.equal(kept, groups >= groups.topk(2, dim=-1).values[..., 1:])
    ties = torch.zeros(2, 8)  # ties are broken by position, never dropping more than asked
    assert unstructured_mask(ties, 0.5, group="row").sum() == 8 and nm_mask(ties).sum() == 8
    with pytest.raises(MegaslimError, match="divisible by 4"):
        nm_mask(torch.rand(3, 10))


def test_2to4_indivisible_and_wanda_without_rows_refused(tok, tmp_path):
    from megaslim.config import load_config
    from megaslim.model.arch import ModelArch
    from megaslim.sparsity.apply import check_pattern, prepare_sparsity

    arch = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=126, num_attention_heads=8,
                     num_query_groups=4, kv_channels=8, vocab_size=320)
    with pytest.raises(MegaslimError, match=r"not divisible by 4: \{'linear_fc2': 126\}"):
        check_pattern(arch, "2:4")
    check_pattern(arch, "unstructured")
    cfg = load_config(None, ["prune.sparsity.method=wanda", "data.calib_path=/nope/calib.txt",
                             f"output_dir={tmp_path}"])
    with pytest.raises(MegaslimError, match="wanda needs calibration rows"):
        prepare_sparsity(cfg, arch, tokenizer=tok)


def test_2to4_on_pruned_shape_refused_before_compute(launch, tiny_llama_tok, tmp_path):
    out = tmp_path / "o"
    proc = launch("prune.py", f"model.load={tiny_llama_tok}", f"output_dir={out}", f"data.calib_path={TEXT}",
                  f"data.eval_path={TEXT}", "data.seq_length=32", "importance.num_samples=4",
                  "prune.export_config.ffn_hidden_size=90", "prune.sparsity.method=magnitude",
                  "prune.sparsity.pattern='2:4'", timeout=120)
    assert proc.returncode == 2 and "not divisible by 4" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


# -- masks on the tiny model at TP=1 -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_llama_tok):
    from megaslim.config import ModelConfig
    from megaslim.sources import resolve_source
    from megaslim.tokenizer import load_tokenizer

    return load_tokenizer(ModelConfig(load=str(tiny_llama_tok)), resolve_source(str(tiny_llama_tok)))


@pytest.fixture(scope="module")
def rows(tok):
    from megaslim.data.calibration import calibration_rows

    return calibration_rows(TEXT, tok, num_samples=6, seq_length=32)


@pytest.fixture(scope="module")
def tp1(megatron_tp1, tiny_llama_tok, rows):
    """The TP=1 model, its Wanda norms (micro-batches of 2) and its linears."""
    from megaslim.config import ModelConfig
    from megaslim.sources import load_model
    from megaslim.sparsity.linears import local_linears
    from megaslim.sparsity.wanda import input_norms

    model, arch, _ = load_model(ModelConfig(load=str(tiny_llama_tok)))
    return model, arch, input_norms(model, rows, micro_batch_size=4), local_linears(model)


def _plain_input_norms(modules, run):
    """||X_j||_2 of each module's input with plain forward pre-hooks (one full-batch forward)."""
    sums, handles = {}, []
    for key, mod in modules.items():
        def pre(m, args, key=key):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[key] = sums.get(key, 0) + x.pow(2).sum(0)
        handles.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {k: v.sqrt() for k, v in sums.items()}


def test_magnitude_and_wanda_masks_equal_direct_references(tp1, rows, tiny_llama_tok):
    from transformers import AutoModelForCausalLM

    from megaslim.sparsity.apply import compute_masks

    model, _, norms, linears = tp1
    tokens = rows[:, :-1]
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    ref_norms = _plain_input_norms({lin.param_name: lin.module for lin in linears},
                                   lambda: model(tokens, pos, None))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_tok))
    hf_mods = {}
    for i, layer in enumerate(hf.model.layers):
        hf_mods.update({(i, "linear_qkv"): layer.self_attn.q_proj, (i, "linear_proj"): layer.self_attn.o_proj,
                        (i, "linear_fc1"): layer.mlp.gate_proj, (i, "linear_fc2"): layer.mlp.down_proj})
    hf_norms = _plain_input_norms(hf_mods, lambda: hf(tokens))

    mag = compute_masks(model, method="magnitude", ratio=0.6, pattern="unstructured")
    wanda = compute_masks(model, method="wanda", ratio=0.5, pattern="unstructured", norms=norms)
    for lin in linears:
        w = lin.weight.detach().double()
        n = lin.param_name
        torch.testing.assert_close(norms[n], ref_norms[n], rtol=1e-12, atol=0)  # micro-batching does not matter
        torch.testing.assert_close(norms[n], hf_norms[(lin.layer, lin.name)], rtol=1e-4, atol=1e-6)  # = HF's
        k = int(w.numel() * 0.6)  # magnitude: one comparison group per layer
        assert torch.equal(mag[n], w.abs() > w.abs().flatten().kthvalue(k).values), n
        score = w.abs() * ref_norms[n]  # wanda: each output row keeps its top half of |W| * ||X||
        keep = w.shape[1] - int(w.shape[1] * 0.5)
        ref = torch.zeros_like(w, dtype=torch.bool).scatter_(1, score.topk(keep, dim=1).indices, True)
        assert torch.equal(wanda[n], ref), n


# -- TP=2 == TP=1, through checkpoints -----------------------------------------------------------------


@pytest.mark.dist
def test_masks_at_tp2_equal_tp1(tp1, rows, tiny_llama_tok, tmp_path):
    from megaslim.sparsity.apply import compute_masks
    from megaslim.sparsity.store import load_masks

    torch.save(rows, tmp_path / "rows.pt")
    torchrun("sparsity_masks.py", tiny_llama_tok, 2, 1, tmp_path / "rows.pt", 2, tmp_path,
             *[f"{m},{p},{r}" for m, p, r in SETTINGS], nproc=2, env={"OMP_NUM_THREADS": "1"})
    model, _, norms, linears = tp1
    for method, pattern, ratio in SETTINGS:
        mine = compute_masks(model, method=method, ratio=ratio, pattern=pattern, norms=norms)
        theirs = load_masks(model, tmp_path / f"{method}_{pattern.replace(':', '')}")  # saved at TP=2
        assert sorted(theirs) == sorted(mine)
        for n in mine:
            assert torch.equal(theirs[n], mine[n]), (method, pattern, n)


# -- prune -> distill (DP=2) -> resume, exact zeros --------------------------------------------------


def _masks_and_weights(ckpt_dir):
    """Full (TP=1 layout) masks and weights of a checkpoint, read in this process."""
    from megaslim.config import ModelConfig
    from megaslim.sources import load_model
    from megaslim.sparsity.store import load_masks

    model, arch, _ = load_model(ModelConfig(load=str(ckpt_dir)))
    params = dict(model.named_parameters())
    masks = load_masks(model, ckpt_dir)
    return masks, {n: params[n].detach().clone() for n in masks}


def _stored(ckpt_dir, key, shape):
    """One stored tensor (e.g. optimizer state in model space) of a checkpoint, read whole."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megaslim import checkpoint as ckpt

    request = {"t": ShardedTensor.from_rank_offsets(key, torch.zeros(shape))}
    with ckpt.quiet_megatron_internals():
        return dist_checkpointing.load(request, ckpt.verify(ckpt_dir)["path"])["t"]


def _check_2to4(masks, weights):
    for n, m in masks.items():
        w = weights[n]
        assert torch.equal(w == 0, ~m), n  # zero exactly where pruned (no kept weight is exactly 0 here)
        assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all(), n
        assert (m.view(m.shape[0], -1, 4).sum(-1) == 2).all(), n


def _distill_args(student, out, *extra):
    return [f"model.load={student['teacher']}", f"distill.student.load={student['ckpt']}",
            f"output_dir={out}", f"data.train_path={TEXT}", f"data.eval_path={TEXT}", "data.seq_length=32",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr=3e-3", "train.warmup_iters=1",
            "train.weight_decay=0.1", "eval.num_samples=2", "data.micro_batch_size=2", *extra]


@pytest.mark.dist
def test_prune_distill_resume_keep_exact_sparsity(megatron_tp1, tiny_llama_tok, tmp_path):
    prune = tmp_path / "prune"
    # width pruning then 2:4 Wanda on the pruned model, at TP=2
    torchrun(ROOT / "launch" / "prune.py", f"model.load={tiny_llama_tok}", f"output_dir={prune}",
             f"data.calib_path={TEXT}", f"data.eval_path={TEXT}", "data.seq_length=32", "importance.num_samples=4",
             "eval.num_samples=2", "prune.export_config.ffn_hidden_size=96", "parallel.tensor_model_parallel_size=2",
             "prune.sparsity.method=wanda", "prune.sparsity.pattern='2:4'", nproc=2, env={"OMP_NUM_THREADS": "1"})
    summary = json.loads((prune / "sparsity.json").read_text())
    assert summary["method"] == "wanda" and summary["pattern"] == "2:4" and summary["fraction"] == 0.5
    assert all(r[n] == 0.5 for r in summary["layers"] for n in NAMES) and len(summary["layers"]) == 4
    assert json.loads((prune / "prune.json").read_text())["sparsity"]["fraction"] == 0.5
    meta = json.loads((prune / "checkpoint" / "iter_0000000" / "megaslim.json").read_text())
    assert meta["extra"]["sparsity"]["method"] == "wanda" and "sparsity_masks" in meta["sharded_extra"]
    masks, w0 = _masks_and_weights(prune / "checkpoint")
    assert w0["decoder.layers.0.mlp.linear_fc2.weight"].shape == (64, 96)
    _check_2to4(masks, w0)

    student = {"teacher": tiny_llama_tok, "ckpt": prune / "checkpoint"}
    out = tmp_path / "distill"
    env = {"OMP_NUM_THREADS": "1"}  # DP=2: megatron's distributed optimizer (fp32 main shards)
    torchrun(ROOT / "launch" / "distill.py", *_distill_args(student, out, "train.train_iters=3",
             "train.exit_interval=2"), nproc=2, env=env)
    m2, w2 = _masks_and_weights(out / "checkpoint")
    assert (out / "checkpoint" / "latest").read_text().strip() == "2"
    for n in masks:
        assert torch.equal(m2[n], masks[n]), n
        assert not torch.equal(w2[n], w0[n]), n  # it trained
    _check_2to4(m2, w2)
    torchrun(ROOT / "launch" / "distill.py", *_distill_args(student, out, "train.train_iters=3", "resume=true"),
             nproc=2, env=env)
    assert (out / "checkpoint" / "latest").read_text().strip() == "3"
    m3, w3 = _masks_and_weights(out / "checkpoint")
    _check_2to4(m3, w3)
    assert all(torch.equal(m3[n], masks[n]) and not torch.equal(w3[n], w2[n]) for n in masks)
    # gradients were masked before the optimizer: Adam's moments (and the main params) of pruned weights are 0
    for name, shape in (("self_attention.linear_qkv", (4, 128, 64)), ("mlp.linear_fc2", (4, 64, 96))):
        pruned = torch.stack([~masks[f"decoder.layers.{i}.{name}.weight"] for i in range(4)])
        for state in ("exp_avg", "exp_avg_sq", "param"):
            t = _stored(out / "checkpoint", f"optimizer.state.{state}.decoder.layers.{name}.weight", shape)
            assert (t[pruned] == 0).all() and (t[~pruned] != 0).any(), (name, state)


def test_resume_without_masks_refused():
    """Trainer.try_resume asks check_resume before loading anything (the successful resume above is the
    path where both agree)."""
    from megaslim.sparsity.train import check_resume

    sparse = {"extra": {"sparsity": {"method": "wanda", "pattern": "2:4"}}, "sharded_extra": ["optimizer"]}
    keeper = object()  # a sparse student's MaskKeeper
    with pytest.raises(MegaslimError, match="sparse run .* holds no sparsity masks"):
        check_resume(sparse, keeper, "ckpt")
    with pytest.raises(MegaslimError, match="the student is sparse but ckpt was written by a dense run"):
        check_resume({"extra": {}, "sharded_extra": ["optimizer"]}, keeper, "ckpt")
    sparse["sharded_extra"].append("sparsity_masks")
    with pytest.raises(MegaslimError, match="is not a sparse checkpoint"):
        check_resume(sparse, None, "ckpt")
    assert check_resume(sparse, keeper, "ckpt") is True
    assert check_resume({"extra": {}, "sharded_extra": ["optimizer"]}, None, "ckpt") is False


@pytest.mark.dist
def test_sparsity_alone_skips_the_importance_pass(tiny_llama_tok, tmp_path):
    out = tmp_path / "s"
    torchrun(ROOT / "launch" / "prune.py", f"model.load={tiny_llama_tok}", f"output_dir={out}",
             f"data.eval_path={TEXT}", "data.seq_length=32", "eval.num_samples=4", "prune.sparsity.method=magnitude",
             "prune.sparsity.ratio=0.25", env={"OMP_NUM_THREADS": "1"})
    assert not (out / "importance.safetensors").exists()
    result = json.loads((out / "prune.json").read_text())
    assert result["params_after"] == result["params_before"]
    sp = json.loads((out / "sparsity.json").read_text())
    assert sp["fraction"] == 0.25 and len(sp["layers"]) == 4
    for layer in sp["layers"]:
        assert all(layer[name] == 0.25 for name in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))

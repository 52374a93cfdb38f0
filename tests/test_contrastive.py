"""Contrastive (InfoNCE) intermediate distillation and the learned student -> teacher hidden projection.

Unit checks of the loss against a hand-built reference, then real launch/distill.py runs between a
width-pruned student (hidden 48, 2 layers) and its teacher (hidden 64, 4 layers): contrastive and
cosine across widths, the projection trained and kept out of the model (HF export, evaluate.py), exact
resume, TP=2 equal to TP=1 and the projection's gradient identical on every TP rank.
"""
import json
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from dist_utils import ROOT, torchrun

from megaslim.config import load_config
from megaslim.distill.losses import (
    HiddenProjection,
    combine_losses,
    contrastive_loss,
    hidden_state_loss,
    intermediate_loss,
)
from megaslim.errors import MegaslimError
from megaslim.model.hf import HFReader

pytestmark = pytest.mark.dist  # multi-process (torchrun over gloo)

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
PAIRS = "distill.intermediate_layer_pairs=[[1,2],[1,3]]"  # both on the last stage at PP=2 too
SEED = 1234  # train.seed's default: the projection's init seed


# ------------------------------------------------------------------------------------- the loss
def _reference_infonce(student, teacher, mask, weight, temperature):
    """Explicit loops: valid positions in [b, s] order, cosine similarities, -log softmax of the diagonal."""
    seq, batch = student.shape[:2]
    pos = [(b, s) for b in range(batch) for s in range(seq) if mask[b, s] > 0]
    proj = [weight @ student[s, b] for b, s in pos]
    tea = [teacher[s, b] for b, s in pos]
    sim = torch.empty(len(pos), len(pos), dtype=torch.float64)
    for i, p in enumerate(proj):
        for j, t in enumerate(tea):
            sim[i, j] = (p @ t) / (p.norm() * t.norm()) / temperature
    total = 0.0
    for i in range(len(pos)):
        total = total - (sim[i, i] - torch.logsumexp(sim[i], dim=0))
    return total / len(pos), sim


def _states(seed=0, s=5, b=3, h_s=4, h_t=6):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(s, b, h_s, generator=g, dtype=torch.float64)
    teacher = torch.randn(s, b, h_t, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, s, generator=g) > 0.3).double()
    mask[0, 0], mask[1, 2] = 0.0, 1.0
    return student, teacher, mask


@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_infonce_equals_reference_with_masking(temperature):
    student, teacher, mask = _states()
    proj = HiddenProjection(4, 6, seed=7).double()
    got = contrastive_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask, projection=proj,
                           temperature=temperature)
    ref, sim = _reference_infonce(student, teacher, mask, proj.weight.detach(), temperature)
    torch.testing.assert_close(got, ref)
    # the same through F.cross_entropy on the hand-built matrix, and through the config dispatcher
    torch.testing.assert_close(got, F.cross_entropy(sim, torch.arange(sim.shape[0])))
    torch.testing.assert_close(got, intermediate_loss(student_hidden=student, teacher_hidden=teacher,
                                                      loss_mask=mask, projection=proj, kind="contrastive",
                                                      temperature=temperature))
    # masked positions do not matter: garbage there changes nothing
    noisy_s, noisy_t = student.clone(), teacher.clone()
    noisy_s[0, 0] += 100.0
    noisy_t[0, 0] -= 50.0
    torch.testing.assert_close(contrastive_loss(student_hidden=noisy_s, teacher_hidden=noisy_t, loss_mask=mask,
                                                projection=proj, temperature=temperature), got)
    # equal widths: an identity-initialised projection is the plain (unprojected) loss
    eye = HiddenProjection(6, 6, seed=3).double()
    torch.testing.assert_close(eye.weight, torch.eye(6, dtype=torch.float64))
    plain = contrastive_loss(student_hidden=teacher * 2 + 1, teacher_hidden=teacher, loss_mask=mask,
                             temperature=temperature)
    torch.testing.assert_close(contrastive_loss(student_hidden=teacher * 2 + 1, teacher_hidden=teacher,
                                                loss_mask=mask, projection=eye, temperature=temperature), plain)


def test_infonce_gradients_reach_projection_and_student():
    student, teacher, mask = _states(seed=1)
    student, teacher = student.float().requires_grad_(), teacher.float().requires_grad_()
    proj = HiddenProjection(4, 6, seed=0)
    loss = contrastive_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask.float(),
                            projection=proj, temperature=0.1)
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None  # the teacher is a constant
    masked = mask.t() == 0  # [s, b] positions left out by the mask get no gradient
    assert student.grad[masked].abs().sum() == 0 and student.grad[~masked].abs().sum() > 0


def test_infonce_edge_cases_and_bad_input():
    student, teacher, mask = _states()
    proj = HiddenProjection(4, 6, seed=0).double()
    empty = contrastive_loss(student_hidden=student.requires_grad_(), teacher_hidden=teacher,
                             loss_mask=torch.zeros_like(mask), projection=proj)
    assert empty.item() == 0.0
    empty.backward()  # still part of the graph
    with pytest.raises(MegaslimError, match="pass a HiddenProjection"):
        contrastive_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask)
    with pytest.raises(MegaslimError, match="temperature must be > 0"):
        contrastive_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask, projection=proj,
                         temperature=0.0)
    with pytest.raises(MegaslimError, match="loss_mask"):
        contrastive_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask.t(), projection=proj)
    with pytest.raises(MegaslimError, match="unknown intermediate loss kind"):
        intermediate_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask, kind="l1")
    # cosine / mse through the dispatcher are unchanged
    torch.testing.assert_close(
        intermediate_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask, projection=proj),
        hidden_state_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask, projection=proj))


def test_projection_seeded_init_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = HiddenProjection(48, 64, seed=SEED), HiddenProjection(48, 64, seed=SEED)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.weight, b.weight) and a.bias is None
    assert not torch.equal(a.weight, HiddenProjection(48, 64, seed=SEED + 1).weight)
    assert a.weight.abs().max() <= 1 / math.sqrt(48)


def test_intermediate_only_is_not_balanced():
    """kd_loss_scale=0: no logit term to balance to, the intermediate terms enter as they are."""
    kd, inter = torch.tensor(2.0), torch.tensor(0.5, requires_grad=True)
    out = combine_losses(kd_loss=kd, intermediate={"contrastive_1_3": inter}, kd_loss_scale=0.0)
    torch.testing.assert_close(out["loss"], torch.tensor(0.5))
    out["loss"].backward()
    torch.testing.assert_close(inter.grad, torch.tensor(1.0))
    # beside logit KD the dynamic balancing stays (value = kd loss)
    out = combine_losses(kd_loss=kd, intermediate={"contrastive_1_3": inter}, kd_loss_scale=1.0)
    torch.testing.assert_close(out["loss"], torch.tensor(4.0))


def test_pairs_across_widths_and_projection_rule():
    from megaslim.distill.train import lm_only, needs_projection, resolve_pairs
    from megaslim.model.arch import ModelArch

    base = dict(num_layers=4, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=4, kv_channels=8,
                vocab_size=320, max_position_embeddings=256)
    teacher = ModelArch(hidden_size=64, **base)
    student = ModelArch(hidden_size=48, **dict(base, num_layers=2))
    same = ModelArch(hidden_size=64, **dict(base, num_layers=2))
    cfg = lambda *o: load_config(None, list(o))  # noqa: E731
    assert resolve_pairs(cfg("distill.intermediate_layer_pairs=[[0,1],[1,3]]"), student, teacher, 1) == \
        [(0, 1), (1, 3)]
    with pytest.raises(MegaslimError, match="not on the last pipeline stage"):
        resolve_pairs(cfg("distill.intermediate_layer_pairs=[[0,1]]"), student, teacher, 2)
    pairs = "distill.intermediate_layer_pairs=[[1,3]]"
    assert needs_projection(cfg(pairs), student, teacher)  # widths differ
    assert not needs_projection(cfg(pairs), same, teacher)  # cosine at equal widths: plain states
    assert needs_projection(cfg(pairs, "distill.intermediate_loss=contrastive"), same, teacher)
    assert not needs_projection(cfg("distill.intermediate_loss=contrastive"), student, teacher)  # no pairs
    # intermediate only: the teacher must still run
    assert not lm_only(cfg(pairs, "distill.kd_loss_scale=0", "distill.skip_lm_loss=true"))


# ------------------------------------------------------------------------------- real distillation
def _args(model_dir, out, plan, *extra):
    return [f"model.load={model_dir}", f"output_dir={out}", f"prune.plan_path={plan}",
            f"data.train_path={TEXT}", f"data.eval_path={TEXT}", "data.seq_length=32",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr=3e-3", "train.min_lr=3e-4",
            "train.warmup_iters=1", "eval.num_samples=2", "data.micro_batch_size=2", *extra]


CONTRASTIVE = ["distill.intermediate_loss=contrastive", PAIRS, "train.train_iters=3"]


@pytest.fixture(scope="module")
def plan_dir(tiny_pruned):
    """The shared tiny plan (hidden 64 -> 48, 4 -> 2 layers) and its pruned student checkpoint."""
    return tiny_pruned


@pytest.fixture(scope="module")
def contrastive_run(tiny_llama_tok, plan_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("contrastive") / "run"
    torchrun(ROOT / "launch" / "distill.py", *_args(tiny_llama_tok, out, plan_dir / "prune_plan.json",
             *CONTRASTIVE, f"export.hf_dir={out}/hf"), nproc=1, timeout=300)
    return out


def _metrics(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for r in rows:
        if "loss" in r:
            by_step[r["step"]] = r  # a resumed run rewrites its steps: the last one counts
    return by_step


def _projection(out):
    """distill_projection.weight of the latest checkpoint (read with DCP, no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from megaslim import checkpoint as ckpt

    path = ckpt.resolve(out / "checkpoint")
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert "distill_projection.weight" in keys and not any(k.startswith("model.") for k in keys)
    sd = {"distill_projection.weight": torch.empty(64, 48)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return sd["distill_projection.weight"]


def test_contrastive_distillation_trains_projection_and_exports_only_the_student(
        tiny_llama_tok, contrastive_run, tmp_path):
    out = contrastive_run
    m = _metrics(out)
    assert sorted(m) == [1, 2, 3]
    for r in m.values():
        for key in ("loss", "kd_loss", "contrastive_1_2", "contrastive_1_3", "grad_norm"):
            assert math.isfinite(r[key]), (key, r)
        # InfoNCE over the 64 positions of a micro-batch starts near log(64)
        assert 0 < r["contrastive_1_3"] < 2 * math.log(64)
    assert m[3]["contrastive_1_3"] < m[1]["contrastive_1_3"]
    # the projection was trained: it moved away from its seeded init
    w = _projection(out)
    assert (w - HiddenProjection(48, 64, seed=SEED).weight).abs().max() > 1e-4
    # the HF export is exactly the student's tensors: the teacher's names for the kept layers, hidden 48
    teacher, student = HFReader(tiny_llama_tok), HFReader(out / "hf")
    kept = {k for k in teacher.keys() if not re.match(r"model\.layers\.([2-9]|\d\d)\.", k)}
    assert student.keys() == kept
    assert student.get("model.embed_tokens.weight").shape[1] == 48
    assert json.loads((out / "hf" / "config.json").read_text())["hidden_size"] == 48
    # the distilled checkpoint loads in evaluate.py (the projection beside it is not read)
    torchrun(ROOT / "launch" / "evaluate.py", f"model.load={out}/checkpoint", f"output_dir={tmp_path}",
             f"data.eval_path={TEXT}", "data.seq_length=32", "eval.num_samples=2", nproc=1)
    assert math.isfinite(json.loads((tmp_path / "eval.json").read_text())["loss"])


def test_exit_then_resume_equals_uninterrupted(tiny_llama_tok, plan_dir, contrastive_run, tmp_path):
    out, plan = tmp_path / "r", plan_dir / "prune_plan.json"
    args = _args(tiny_llama_tok, out, plan, *CONTRASTIVE, f"export.hf_dir={out}/hf")
    torchrun(ROOT / "launch" / "distill.py", *args, "train.exit_interval=2", nproc=1, timeout=300)
    assert (out / "checkpoint" / "latest").read_text().strip() == "2" and not (out / "hf").exists()
    torchrun(ROOT / "launch" / "distill.py", *args, "resume=true", nproc=1, timeout=300)
    a, b = _metrics(contrastive_run), _metrics(out)
    assert sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "contrastive_1_2", "contrastive_1_3"):
            assert a[step][key] == b[step][key], (step, key)  # bitwise on CPU
    assert torch.equal(_projection(contrastive_run), _projection(out))
    wa, wb = HFReader(contrastive_run / "hf"), HFReader(out / "hf")
    for k in wa.keys():
        assert torch.equal(wa.get(k), wb.get(k)), k
    # a run saved with the projection does not resume under a config without one (before any load)
    no_pairs = [a for a in args if not a.startswith(("distill.intermediate", "export.hf_dir"))]
    proc = torchrun(ROOT / "launch" / "distill.py", *no_pairs, "train.train_iters=4", "resume=true", nproc=1,
                    timeout=300, check=False)
    assert proc.returncode != 0 and "written with the learned intermediate-loss projection" in proc.stderr


def test_projection_resume_rule():
    from megaslim.distill.train import check_projection_resume

    check_projection_resume({"projection": True}, True, "ckpt")
    check_projection_resume({}, False, "ckpt")  # checkpoints from before the record: no projection
    with pytest.raises(MegaslimError, match="written without .* this config needs one"):
        check_projection_resume({"projection": False}, True, "ckpt")
    with pytest.raises(MegaslimError, match="written with .* this config uses none"):
        check_projection_resume({"projection": True}, False, "ckpt")


def test_cosine_across_widths_now_trains_at_dp2(tiny_llama_tok, plan_dir, tmp_path):
    """Formerly refused; at DP=2 the projection also goes through the distributed optimizer."""
    out = tmp_path / "cos"
    torchrun(ROOT / "launch" / "distill.py", *_args(tiny_llama_tok, out, plan_dir / "prune_plan.json",
             "distill.intermediate_layer_pairs=[[0,1],[1,3]]", "distill.intermediate_loss=cosine",
             "train.train_iters=2"), nproc=2, timeout=300)
    m = _metrics(out)
    assert sorted(m) == [1, 2]
    for r in m.values():
        assert all(math.isfinite(r[k]) for k in ("loss", "hidden_0_1", "hidden_1_3"))
        assert 0 <= r["hidden_1_3"] <= 2  # 1 - cos
    _projection(out)  # a projection was used (widths differ) and saved beside the optimizer


def test_tp2_pp2_equal_tp1_and_projection_grads_identical_on_tp_ranks(tiny_llama_tok, plan_dir, contrastive_run,
                                                                      tmp_path):
    ref = _metrics(contrastive_run)
    # PP=2: the projection exists on the last stage only (and is saved from there)
    for tp, pp in [(2, 1), (1, 2)]:
        out = tmp_path / f"tp{tp}pp{pp}"
        torchrun(ROOT / "launch" / "distill.py", *_args(tiny_llama_tok, out, plan_dir / "prune_plan.json",
                 *CONTRASTIVE, f"parallel.tensor_model_parallel_size={tp}",
                 f"parallel.pipeline_model_parallel_size={pp}"), nproc=2, timeout=300)
        got = _metrics(out)
        for step in (1, 2, 3):
            for key in ("loss", "kd_loss", "contrastive_1_2", "contrastive_1_3"):
                assert got[step][key] == pytest.approx(ref[step][key], abs=1e-5), (tp, pp, step, key)
        assert (_projection(out) - _projection(contrastive_run)).abs().max() < 1e-5, (tp, pp)
    # in-process at TP=2: initial weights, gradient and update identical on both TP ranks, and the
    # projection is no parameter / state-dict entry of the student
    torchrun("contrastive_tp_grads.py", tiny_llama_tok, plan_dir / "checkpoint", tmp_path / "w.json", nproc=2)
    assert math.isfinite(json.loads((tmp_path / "w.json").read_text())["loss"])


def test_offline_logits_still_refuse_pairs(tiny_llama_tok, plan_dir, tmp_path):
    from megaslim.commands.distill import check_offline_config

    cfg = load_config(None, ["distill.kl=topk", f"distill.student.load={plan_dir}/checkpoint", PAIRS,
                             "distill.intermediate_loss=contrastive"])
    with pytest.raises(MegaslimError, match="unset distill.intermediate_layer_pairs"):
        check_offline_config(cfg, tmp_path)

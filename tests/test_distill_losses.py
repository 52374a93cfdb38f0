"""Distillation losses: logit KD kinds equal their definitions at TP=1 and TP=2 (values and student-logit
gradients, padded vocab ignored); intermediate losses, layer mapping, balancing, totals."""
import pytest
import torch
import torch.nn.functional as F
from dist_utils import torchrun
from workers.kd_loss_tp import CASES, PADDED, VOCAB, make_logits, reference_per_token

from megaslim.distill import (
    BALANCE_EPS,
    HiddenProjection,
    balance_to_logit_loss,
    combine_losses,
    hidden_state_loss,
    hidden_state_loss_per_token,
    intermediate_layer_pairs,
    logit_kd_loss,
    logit_kd_per_token,
    masked_mean,
    vocab_parallel_log_softmax,
)
from megaslim.errors import MegaslimError

pytestmark = pytest.mark.usefixtures("megatron_tp1")


# ------------------------------------------------------------------------------------------- logit KD
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_forward_kl_equals_kl_div_reference(tau):
    g = torch.Generator().manual_seed(1)
    b, s, v = 3, 5, 11
    student, teacher = torch.randn(b, s, v, generator=g) * 3, torch.randn(b, s, v, generator=g) * 3
    mask = torch.ones(b, s)
    mask[0, 2:] = 0
    mask[2, 0] = 0
    keep = mask.bool()
    log_q = F.log_softmax(student / tau, dim=-1)[keep]
    log_p = F.log_softmax(teacher / tau, dim=-1)[keep]
    ref = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / keep.sum() * tau ** 2
    got = logit_kd_loss(student_logits=student, teacher_logits=teacher, loss_mask=mask, vocab_size=v,
                        temperature=tau)
    assert got.dim() == 0
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # masked tokens really are out: garbage there changes nothing
    student2 = student.clone()
    student2[~keep] = 50.0
    got2 = logit_kd_loss(student_logits=student2, teacher_logits=teacher, loss_mask=mask, vocab_size=v,
                         temperature=tau)
    torch.testing.assert_close(got2, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind, kw", CASES, ids=[f"{k}-{kw}" for k, kw in CASES])
def test_kinds_equal_definitions_with_grads_tp1(kind, kw):
    """Padded columns hold huge values; loss, per-token loss and gradient equal the unpadded reference."""
    student, teacher, mask = make_logits(4, 3, seed=7)
    ref_s = student.clone().requires_grad_(True)
    ref_tok = reference_per_token(ref_s, teacher, vocab_size=VOCAB, kind=kind, **kw)
    ref = (ref_tok * mask).sum() / mask.sum()
    ref.backward()

    st = student.clone().requires_grad_(True)
    tok = logit_kd_per_token(student_logits=st, teacher_logits=teacher, vocab_size=VOCAB, kind=kind, **kw)
    assert tok.shape == mask.shape
    torch.testing.assert_close(tok, ref_tok.detach(), rtol=1e-6, atol=1e-6)
    loss = masked_mean(tok, mask)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(st.grad[..., :VOCAB], ref_s.grad[..., :VOCAB], rtol=1e-6, atol=1e-6)
    assert torch.all(st.grad[..., VOCAB:] == 0)
    assert ref.item() > 1e-3  # a real, non-trivial loss is compared

    # the same logits without the padded columns give the same loss: padding is invisible
    unpadded = logit_kd_loss(student_logits=student[..., :VOCAB], teacher_logits=teacher[..., :VOCAB],
                             loss_mask=mask, vocab_size=VOCAB, kind=kind, **kw)
    torch.testing.assert_close(unpadded, loss.detach(), rtol=1e-6, atol=1e-6)


def test_identical_distributions_give_zero_and_kinds_differ():
    student, teacher, mask = make_logits(2, 5, seed=3)
    for kind, kw in CASES:
        same = logit_kd_loss(student_logits=teacher, teacher_logits=teacher, loss_mask=mask,
                             vocab_size=VOCAB, kind=kind, **kw)
        assert abs(same.item()) < 1e-6, kind
    values = {k: logit_kd_loss(student_logits=student, teacher_logits=teacher, loss_mask=mask,
                               vocab_size=VOCAB, kind=k, top_k=3).item()
              for k in ("forward", "reverse", "jsd", "topk")}
    assert len({round(v, 6) for v in values.values()}) == 4, values


def test_teacher_gets_no_gradient_and_bf16_student():
    student, teacher, mask = make_logits(3, 4, seed=5)
    t = teacher.clone().requires_grad_(True)
    s16 = student.to(torch.bfloat16).requires_grad_(True)
    loss = logit_kd_loss(student_logits=s16, teacher_logits=t, loss_mask=mask, vocab_size=VOCAB)
    loss.backward()
    assert t.grad is None
    assert loss.dtype == torch.float32 and s16.grad.dtype == torch.bfloat16
    ref = (reference_per_token(s16.detach().float(), teacher, vocab_size=VOCAB) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-5)


def test_forward_kl_backward_in_place_once_only():
    """The forward KL writes the student's logit gradient into its saved tensor: the gradient still equals
    the reference, and a second backward of the same graph is refused instead of reading it."""
    student, teacher, mask = make_logits(3, 4, seed=9)
    st = student.clone().requires_grad_(True)
    loss = logit_kd_loss(student_logits=st, teacher_logits=teacher, loss_mask=mask, vocab_size=VOCAB)
    loss.backward(retain_graph=True)
    ref_s = student.clone().requires_grad_(True)
    ((reference_per_token(ref_s, teacher, vocab_size=VOCAB) * mask).sum() / mask.sum()).backward()
    torch.testing.assert_close(st.grad[..., :VOCAB], ref_s.grad[..., :VOCAB], rtol=1e-6, atol=1e-6)
    with pytest.raises(MegaslimError, match="back-propagated twice"):
        loss.backward()


@pytest.mark.parametrize("kind, kw", CASES, ids=[f"{k}-{kw}" for k, kw in CASES])
def test_teacher_owned_logits_give_the_same_loss_and_gradient(kind, kw):
    """teacher_owned lets the loss overwrite the teacher logits with their log-softmax (one [tokens,
    vocab] tensor fewer): the loss and the student's gradient are those of the non-owning call."""
    student, teacher, mask = make_logits(4, 3, seed=11)
    student, teacher = student[..., :VOCAB], teacher[..., :VOCAB]  # unpadded: nothing copies the teacher first
    results = []
    for owned in (False, True):
        st, t = student.clone().requires_grad_(True), teacher.clone()
        loss = masked_mean(logit_kd_per_token(student_logits=st, teacher_logits=t, vocab_size=VOCAB, kind=kind,
                                              teacher_owned=owned, **kw), mask)
        loss.backward()
        results.append((loss.detach(), st.grad, t))
    (ref, ref_g, kept), (got, got_g, overwritten) = results
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-6, atol=1e-6)
    assert torch.equal(kept, teacher)  # not owned: the caller's logits are untouched
    if kind != "topk" and kw.get("temperature", 1.0) == 1.0:  # else a tempered copy is what gets overwritten
        assert not torch.equal(overwritten, teacher)  # its storage held log p (the forward KL then reuses it)


def test_vocab_parallel_log_softmax_tp1():
    x = torch.randn(4, 9, requires_grad=True)
    y = vocab_parallel_log_softmax(x)
    torch.testing.assert_close(y, F.log_softmax(x, dim=-1))
    (g,) = torch.autograd.grad((y * torch.arange(9.0)).sum(), x)
    x2 = x.detach().requires_grad_(True)
    (g2,) = torch.autograd.grad((F.log_softmax(x2, -1) * torch.arange(9.0)).sum(), x2)
    torch.testing.assert_close(g, g2)


@pytest.mark.dist
def test_all_kinds_equal_reference_at_tp2():
    """Real 2-process gloo job: half the (padded) vocab per rank; values and gathered grads within 1e-5."""
    proc = torchrun("kd_loss_tp.py", "2", nproc=2, timeout=180)
    n = 2 * len(CASES)
    assert f"rank 0 OK {n} cases at TP=2" in proc.stdout
    assert f"rank 1 OK {n} cases at TP=2" in proc.stdout


@pytest.mark.parametrize("kwargs, needle", [
    ({"kind": "kld"}, "unknown KD loss kind 'kld'"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"kind": "jsd", "beta": 1.0}, "beta must be in (0, 1)"),
    ({"kind": "topk"}, "integer top_k"),
    ({"kind": "topk", "top_k": VOCAB + 1}, "integer top_k"),
    ({"vocab_size": PADDED + 1}, "does not fit"),
    ({"teacher_cut": True}, "must share the tokenizer"),
    ({"mask_t": True}, "loss_mask (4, 3) does not match"),
])
def test_logit_kd_bad_input(kwargs, needle):
    student, teacher, mask = make_logits(3, 4, seed=0)
    kwargs = dict(kwargs)
    if kwargs.pop("teacher_cut", False):
        teacher = teacher[..., :-1]
    if kwargs.pop("mask_t", False):
        mask = mask.t()
    kwargs.setdefault("vocab_size", VOCAB)
    with pytest.raises(MegaslimError) as err:
        logit_kd_loss(student_logits=student, teacher_logits=teacher, loss_mask=mask, **kwargs)
    assert needle in str(err.value)


# ------------------------------------------------------------------------------ intermediate losses
def test_hidden_losses_match_hand_values():
    # s=3 tokens, b=1: [1,0]/[0,1] orthogonal, [1,1]/[2,2] parallel, [1,2]/[3,2] masked out
    student = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[1.0, 2.0]]])
    teacher = torch.tensor([[[0.0, 1.0]], [[2.0, 2.0]], [[3.0, 2.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # [b, s]
    cos_tok = hidden_state_loss_per_token(student_hidden=student, teacher_hidden=teacher, kind="cosine")
    torch.testing.assert_close(cos_tok, torch.tensor([[1.0, 0.0, 1.0 - 7.0 / (5 ** 0.5 * 13 ** 0.5)]]))
    mse_tok = hidden_state_loss_per_token(student_hidden=student, teacher_hidden=teacher, kind="mse")
    torch.testing.assert_close(mse_tok, torch.tensor([[1.0, 1.0, 2.0]]))  # mean over the width
    cos = hidden_state_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask, kind="cosine")
    mse = hidden_state_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask, kind="mse")
    torch.testing.assert_close(cos, torch.tensor(0.5))
    torch.testing.assert_close(mse, torch.tensor(1.0))
    # an identity-initialised projection changes nothing
    proj = HiddenProjection(2, 2)
    torch.testing.assert_close(proj.weight, torch.eye(2))
    with_proj = hidden_state_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask,
                                  projection=proj, kind="mse")
    torch.testing.assert_close(with_proj, mse)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_projection_and_student_get_gradients(kind):
    g = torch.Generator().manual_seed(0)
    s, b = 5, 2
    student = torch.randn(s, b, 4, generator=g, requires_grad=True)
    teacher = torch.randn(s, b, 6, generator=g, requires_grad=True)
    mask = torch.ones(b, s)
    proj = HiddenProjection(4, 6, bias=True)
    loss = hidden_state_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask,
                             projection=proj, kind=kind)
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert proj.bias.grad.abs().sum() > 0
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None  # the teacher is frozen
    # hand check through the projection
    out = proj(student.detach())
    ref = (1 - F.cosine_similarity(out, teacher.detach(), dim=-1)) if kind == "cosine" else \
        (out - teacher.detach()).pow(2).mean(-1)
    torch.testing.assert_close(loss, ref.mean())


def test_hidden_loss_bad_input():
    student, teacher, mask = torch.randn(3, 2, 4), torch.randn(3, 2, 6), torch.ones(2, 3)
    with pytest.raises(MegaslimError, match="pass a HiddenProjection"):
        hidden_state_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask)
    with pytest.raises(MegaslimError, match="unknown intermediate loss kind"):
        hidden_state_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask, kind="l1",
                          projection=HiddenProjection(4, 6))
    with pytest.raises(MegaslimError, match="loss_mask"):
        hidden_state_loss(student_hidden=student, teacher_hidden=teacher, loss_mask=mask.t(),
                          projection=HiddenProjection(4, 6))


def test_layer_pairs_default_and_validation():
    assert intermediate_layer_pairs(student_layers=4, teacher_layers=6) == [(0, 1), (1, 2), (2, 4), (3, 5)]
    assert intermediate_layer_pairs(student_layers=4, teacher_layers=6, num_pairs=2) == [(1, 2), (3, 5)]
    assert intermediate_layer_pairs(student_layers=20, teacher_layers=30, num_pairs=1) == [(19, 29)]
    assert intermediate_layer_pairs(student_layers=3, teacher_layers=3) == [(0, 0), (1, 1), (2, 2)]
    assert intermediate_layer_pairs(student_layers=4, teacher_layers=6, pairs=[[0, 1], [-1, -1]]) == \
        [(0, 1), (3, 5)]
    bad = [
        ({"pairs": [[4, 5]]}, "student layer 4 is out of range"),
        ({"pairs": [[0, 6]]}, "teacher layer 6 is out of range"),
        ({"pairs": [[-5, 0]]}, "student layer -5 is out of range"),
        ({"pairs": [[0, 1, 2]]}, "is not a [student_layer, teacher_layer] pair"),
        ({"pairs": [[0, "1"]]}, "is not an integer"),
        ({"pairs": [[0, 1], [0, 1]]}, "duplicate"),
        ({"num_pairs": 5}, "num_pairs must be in [1, 4]"),
    ]
    for kwargs, needle in bad:
        with pytest.raises(MegaslimError) as err:
            intermediate_layer_pairs(student_layers=4, teacher_layers=6, **kwargs)
        assert needle in str(err.value), (kwargs, str(err.value))


# ------------------------------------------------------------------------------ balancing and total
def test_balance_matches_logit_loss_and_scales_gradient():
    x = torch.tensor([2.0], requires_grad=True)
    inter = (x ** 2).sum()  # 4, d/dx = 4
    logit = torch.tensor(0.5, requires_grad=True)
    bal = balance_to_logit_loss(inter, logit_loss=logit)
    torch.testing.assert_close(bal.detach(), torch.tensor(0.5))
    bal.backward()
    torch.testing.assert_close(x.grad, torch.tensor([4.0 * 0.5 / 4.0]))
    assert logit.grad is None  # ratio is detached: no gradient into the logit loss
    # vanished intermediate loss: floored denominator, finite result
    z = torch.zeros(1, requires_grad=True)
    zero_bal = balance_to_logit_loss((z ** 2).sum(), logit_loss=torch.tensor(0.5))
    zero_bal.backward()
    assert torch.isfinite(zero_bal) and torch.isfinite(z.grad).all()
    assert BALANCE_EPS > 0


def test_combine_losses():
    kd = torch.tensor(2.0, requires_grad=True)
    lm = torch.tensor(3.0, requires_grad=True)
    inter = torch.tensor(0.1, requires_grad=True)
    out = combine_losses(kd_loss=kd, lm_loss=lm, intermediate={"hidden_0": inter}, kd_loss_scale=0.5)
    torch.testing.assert_close(out["loss"], torch.tensor(0.5 * 2.0 + 2.0))  # lm skipped by default
    assert out["lm_loss"].item() == 3.0 and out["hidden_0"].item() == pytest.approx(0.1)
    assert not out["kd_loss"].requires_grad and out["loss"].requires_grad
    out["loss"].backward()
    assert lm.grad is None
    torch.testing.assert_close(inter.grad, torch.tensor(2.0 / 0.1))  # balanced: scaled by kd / inter
    out = combine_losses(kd_loss=kd, lm_loss=lm, intermediate={"hidden_0": inter}, skip_lm_loss=False,
                         balance=False)
    torch.testing.assert_close(out["loss"], torch.tensor(2.0 + 3.0 + 0.1))
    with pytest.raises(MegaslimError, match="no LM loss"):
        combine_losses(kd_loss=kd, skip_lm_loss=False)

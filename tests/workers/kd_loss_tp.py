"""Worker: logit KD losses at TP=N on vocab shards equal the full-vocab reference, gradients included.

usage: torchrun --nproc-per-node N kd_loss_tp.py
Every rank builds the same full tensors (padded vocab, huge values in the padded columns), keeps its own
vocab shard, and checks the per-token and reduced losses and the gathered student-logit gradient of every
kind against `reference_per_token` (plain torch on the unpadded vocabulary). Also imported by
tests/test_distill_losses.py for the same references at TP=1.
"""
import sys

import torch
import torch.nn.functional as F

VOCAB, PADDED = 13, 16  # 3 padded columns: all on the last rank at TP=2
CASES = [  # (kind, kwargs)
    ("forward", {}),
    ("forward", {"temperature": 2.0}),
    ("reverse", {"temperature": 0.5}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.2, "temperature": 2.0}),
    ("topk", {"top_k": 5}),
    ("topk", {"top_k": 10, "temperature": 2.0}),  # k > shard width: every column is a candidate
]


def reference_per_token(student, teacher, *, vocab_size, kind="forward", temperature=1.0, beta=0.5,
                        top_k=None):
    """The definitions, on full (gathered) logits, ignoring the padded columns entirely."""
    s = student[..., :vocab_size] / temperature
    t = teacher[..., :vocab_size].detach() / temperature
    log_q, log_p = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    if kind == "forward":
        loss = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    elif kind == "reverse":
        loss = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    elif kind == "jsd":
        p, q = log_p.exp(), log_q.exp()
        m = beta * p + (1 - beta) * q
        loss = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    elif kind == "topk":
        idx = t.topk(top_k, dim=-1).indices
        lp = F.log_softmax(t.gather(-1, idx), dim=-1)
        lq = F.log_softmax(s.gather(-1, idx), dim=-1)
        loss = (lp.exp() * (lp - lq)).sum(-1)
    else:
        raise ValueError(kind)
    return loss * temperature ** 2


def make_logits(*shape, seed=0, dtype=torch.float32):
    """Student, teacher [*shape, PADDED] with garbage in the padded columns, and a 0/1 mask [*shape]."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, PADDED, generator=g, dtype=dtype) * 2
    teacher = torch.randn(*shape, PADDED, generator=g, dtype=dtype) * 2
    student[..., VOCAB:] = 1e4
    teacher[..., VOCAB:] = 3e4
    mask = (torch.rand(*shape, generator=g) > 0.3).float()
    return student, teacher, mask


def main():
    from megaslim.runtime import init_runtime

    tp = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    rt = init_runtime(tp=tp)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megaslim.distill import logit_kd_loss, logit_kd_per_token

    rank, part = ps.get_tensor_model_parallel_rank(), PADDED // tp
    checked = 0
    for layout, shape in (("sbv", (6, 3)), ("bsv", (3, 6))):
        student, teacher, mask = make_logits(*shape, seed=len(layout) + shape[0])
        for kind, kw in CASES:
            ref_s = student.clone().requires_grad_(True)
            ref_tok = reference_per_token(ref_s, teacher, vocab_size=VOCAB, kind=kind, **kw)
            ref = (ref_tok * mask).sum() / mask.sum()
            ref.backward()

            shard = student[..., rank * part:(rank + 1) * part].clone().requires_grad_(True)
            t_shard = teacher[..., rank * part:(rank + 1) * part]
            tok = logit_kd_per_token(student_logits=shard, teacher_logits=t_shard, vocab_size=VOCAB,
                                     kind=kind, **kw)
            loss = logit_kd_loss(student_logits=shard, teacher_logits=t_shard, loss_mask=mask,
                                 vocab_size=VOCAB, kind=kind, **kw)
            loss.backward()
            grad = gather_from_tensor_model_parallel_region(shard.grad)
            what = f"rank {rank} {layout} {kind} {kw}"
            torch.testing.assert_close(tok.detach(), ref_tok.detach(), rtol=1e-5, atol=1e-5, msg=what)
            torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-5, msg=what)
            torch.testing.assert_close(grad[..., :VOCAB], ref_s.grad[..., :VOCAB], rtol=1e-5, atol=1e-5,
                                       msg=what)
            assert torch.all(grad[..., VOCAB:] == 0), f"{what}: padded columns got gradient"
            assert ref_s.grad.abs().sum() > 0 and torch.isfinite(grad).all(), what
            checked += 1
    print(f"kd_loss_tp rank {rt.rank} OK {checked} cases at TP={tp}", flush=True)


if __name__ == "__main__":
    from megaslim.runtime import main_guard

    main_guard(main)

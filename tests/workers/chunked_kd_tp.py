"""Worker: chunked logit losses (from the final hidden states) equal the whole-logit ones at TP=N.

usage: torchrun --nproc-per-node N chunked_kd_tp.py TEACHER_HF_DIR STUDENT_HF_DIR
Loads both tiny models at TP = world size, and for every case (each `distill.kl` kind, offline top-k,
LM loss on/off, LM only) and several chunk sizes checks KD loss, LM loss and every student parameter's
gradient (this rank's shard) against the unchunked path within fp32 tolerance. Also imported by
tests/test_chunked_kd.py for the same checks at TP=1 in-process.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megaslim.distill.chunked import (  # noqa: E402
    OFFLINE,
    LogitLoss,
    chunked_logit_losses,
    final_hidden_states,
    logit_loss_sums,
)

CASES = [  # (kind, LogitLoss keyword arguments)
    ("forward", {}),
    ("forward", {"temperature": 2.0, "lm": True}),
    ("reverse", {"temperature": 0.5}),
    ("jsd", {"beta": 0.3}),
    ("topk", {"top_k": 5, "lm": True}),
    (OFFLINE, {"top_k": 5}),
    (OFFLINE, {"temperature": 2.0, "lm": True}),
    (None, {"lm": True}),  # LM only
]
CHUNKS = (0, 10, 1, 4096)  # whole (the default), uneven last chunk, one position per chunk, one chunk for all
B, S, K = 2, 16, 8


def make_batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, S), generator=g)
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
            "loss_mask": (torch.rand(B, S, generator=g) > 0.25).float(),
            "position_ids": torch.arange(S).expand(B, S).contiguous()}


def add_offline_topk(batch: dict, teacher, vocab: int) -> dict:
    from megaslim.distill.offline import topk_logprobs

    with torch.no_grad():
        logits = teacher(batch["tokens"], batch["position_ids"], None)
    idx, logp = topk_logprobs(logits, vocab_size=vocab, k=K)
    return {**batch, "teacher_topk_idx": idx, "teacher_topk_logp": logp}


def logits_reference(spec: LogitLoss, s_logits, t_logits, batch: dict):
    """(KD loss, LM loss) from GPTModel's own [b, s, V/TP] logits: the reference for the hidden-state path."""
    mask = batch["loss_mask"]
    kd, lm = logit_loss_sums(spec, s_logits, t_logits, mask, batch.get("labels"),
                             batch.get("teacher_topk_idx"), batch.get("teacher_topk_logp"))
    count = mask.to(torch.float32).sum().clamp_min(1)
    return kd / count, lm / count


def losses_and_grads(student, teacher, spec: LogitLoss, batch: dict, chunk_tokens):
    """(kd, lm, {param name: grad}) of kd + 0.7 * lm through GPTModel's own logits (chunk_tokens=None) or
    megaslim's path from the final hidden states (0: whole, else that chunk size)."""
    student.zero_grad(set_to_none=True)
    args = (batch["tokens"], batch["position_ids"], None)
    online = spec.kind not in (None, OFFLINE)
    if chunk_tokens is not None:
        with final_hidden_states(student):
            s_out = student(*args)
        with torch.no_grad(), final_hidden_states(teacher):
            t_out = teacher(*args) if online else None
        kd, lm = chunked_logit_losses(spec, student=student, s_hidden=s_out, teacher=teacher, t_hidden=t_out,
                                      batch=batch, chunk_tokens=chunk_tokens)
    else:
        s_out = student(*args)
        with torch.no_grad():
            t_out = teacher(*args) if online else None
        kd, lm = logits_reference(spec, s_out, t_out, batch)
    (kd + 0.7 * lm).backward()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}
    return kd.detach(), lm.detach(), grads


def check_all(student, teacher, vocab: int, where: str) -> int:
    """Every case x chunk size against GPTModel's own logits; returns the number of comparisons."""
    student.train()
    batch = add_offline_topk(make_batch(vocab), teacher, vocab)
    checked = 0
    for kind, kw in CASES:
        spec = LogitLoss(vocab_size=vocab, kind=kind, **kw)
        ref_kd, ref_lm, ref_g = losses_and_grads(student, teacher, spec, batch, None)
        assert ref_g and all(torch.isfinite(g).all() for g in ref_g.values())
        assert (ref_kd > 0) == (kind is not None) and (ref_lm > 0) == spec.lm, (kind, kw, ref_kd, ref_lm)
        for chunk in CHUNKS:
            kd, lm, grads = losses_and_grads(student, teacher, spec, batch, chunk)
            what = f"{where} {kind} {kw} chunk={chunk}"
            torch.testing.assert_close(kd, ref_kd, msg=what)
            torch.testing.assert_close(lm, ref_lm, msg=what)
            assert grads.keys() == ref_g.keys(), what
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_g[name], rtol=1e-5, atol=1e-6, msg=f"{what} {name}")
            checked += 1
    return checked


def main():
    import os

    from megaslim.config import ModelConfig
    from megaslim.runtime import init_runtime
    from megaslim.sources import load_model

    teacher_dir, student_dir = sys.argv[1:3]
    tp = int(os.environ["WORLD_SIZE"])
    rt = init_runtime(tp=tp, pp=1)
    teacher, t_arch, _ = load_model(ModelConfig(load=teacher_dir))
    student, _, _ = load_model(ModelConfig(load=student_dir))
    n = check_all(student, teacher, t_arch.vocab_size, f"rank {rt.rank} TP={tp}")
    print(f"chunked_kd_tp rank {rt.rank} OK {n} cases at TP={tp}", flush=True)


if __name__ == "__main__":
    from megaslim.runtime import main_guard

    main_guard(main)

"""Logit KD and LM losses from the final hidden states, whole or in chunks of tokens.

Each model's forward stops before its output layer; the output layers run here, in megatron's [s, b]
order, so GPTModel's [s, b, V/TP] -> [b, s, V/TP] copies of both models' logits (and of the student's
logit gradient) are never made: the small [b, s] masks and labels are transposed instead.
Whole (`distill.logit_chunk_tokens` 0, the default): one chunk, nothing recomputed.
Chunked (> 0): per chunk of sequence positions the output layer and the loss run under non-reentrant
activation checkpointing, so only the chunk's scalar sums are kept and its logits are recomputed in
backward. Neither model's [tokens, vocab/TP] logits, nor the student's logit gradient, exist whole at any
time. The per-token losses are the same functions either way (vocab-parallel, every `distill.kl` kind and
offline top-k), so values and gradients equal the whole ones up to float summation order.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from megaslim.distill import losses
from megaslim.distill.offline import offline_topk_kl_per_token
from megaslim.errors import MegaslimError
from megaslim.model.logits import vocab_parallel_ce

OFFLINE = "offline"  # LogitLoss.kind for stored teacher top-k


@dataclass(frozen=True)
class LogitLoss:
    """What to compute from the logits: `kind` a `distill.kl` kind, OFFLINE (stored teacher top-k), or
    None (no KD term); `lm` adds the next-token loss on the same logits."""
    vocab_size: int
    kind: Optional[str]
    temperature: float = 1.0
    beta: float = 0.5
    top_k: Optional[int] = None
    lm: bool = False


@contextlib.contextmanager
def final_hidden_states(model):
    """Within the block, `model` (a megatron GPTModel) returns its decoder output ([s, b, h], final norm
    applied) instead of logits: GPTModel._postprocess returns the hidden states when `post_process` is
    False, and nothing else in its forward reads that flag. Restored on exit."""
    saved = model.post_process
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = saved


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """`model`'s output layer on [c, b, h] states: vocab-parallel logits [c, b, V/TP], as its forward
    makes them (tied embeddings: the shared weight)."""
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=weight)
    return logits


def _kd_per_token(spec: LogitLoss, s_logits, t_logits, topk_idx, topk_logp,
                  teacher_owned: bool = False) -> torch.Tensor:
    if spec.kind == OFFLINE:
        return offline_topk_kl_per_token(student_logits=s_logits, topk_idx=topk_idx, topk_logp=topk_logp,
                                         vocab_size=spec.vocab_size, temperature=spec.temperature,
                                         top_k=spec.top_k)
    return losses.logit_kd_per_token(student_logits=s_logits, teacher_logits=t_logits,
                                     vocab_size=spec.vocab_size, kind=spec.kind, temperature=spec.temperature,
                                     beta=spec.beta, top_k=spec.top_k if spec.kind == "topk" else None,
                                     teacher_owned=teacher_owned)


def logit_loss_sums(spec: LogitLoss, s_logits: torch.Tensor, t_logits: Optional[torch.Tensor],
                    mask: torch.Tensor, labels: Optional[torch.Tensor] = None,
                    topk_idx: Optional[torch.Tensor] = None,
                    topk_logp: Optional[torch.Tensor] = None,
                    teacher_owned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked sum of the per-token KD loss, masked sum of the per-token LM loss) over logits of any
    leading layout; `mask`, `labels`, `topk_*` in that layout. A term that is off is a 0 scalar. The KD
    term runs first: megatron's vocab-parallel cross-entropy works in place on the logits, so where the
    KD term's graph keeps them (top-k kinds pick the student logits with `gather`, which saves its input)
    the cross-entropy gets its own copy. `teacher_owned`: `t_logits` may be overwritten
    (losses.logit_kd_per_token)."""
    zero = torch.zeros((), dtype=torch.float32, device=s_logits.device)
    kd = zero
    if spec.kind is not None:
        kd, _ = losses.masked_sum_and_count(
            _kd_per_token(spec, s_logits, t_logits, topk_idx, topk_logp, teacher_owned), mask)
    lm = zero
    if spec.lm:
        ce_in = s_logits.clone() if spec.kind in ("topk", OFFLINE) else s_logits
        lm, _ = losses.masked_sum_and_count(vocab_parallel_ce(ce_in, labels, spec.vocab_size), mask)
    return kd, lm


def _chunk_sums(spec: LogitLoss, student, teacher, s_hidden, t_hidden, mask, labels, topk_idx, topk_logp):
    """One chunk: output layers then `logit_loss_sums`; run (and rerun in backward) under checkpoint."""
    s_logits = output_logits(student, s_hidden)
    t_logits = None
    if t_hidden is not None:
        with torch.no_grad():
            t_logits = output_logits(teacher, t_hidden)
    # the teacher's logits are made here for this loss alone: it may overwrite them
    kd, lm = logit_loss_sums(spec, s_logits, t_logits, mask, labels, topk_idx, topk_logp, teacher_owned=True)
    return kd, lm


def _chunks(x: Optional[torch.Tensor], rows: int, n: int, *, batch_major: bool = False) -> list:
    """x split into n chunks of `rows` sequence positions; a [b, s, ...] batch tensor goes to the hidden
    states' [s, b, ...] layout first, each chunk contiguous (megatron's cross-entropy views its target
    flat). None gives n Nones."""
    if x is None:
        return [None] * n
    if not batch_major:
        return list(x.split(rows, dim=0))
    return [c.contiguous() for c in x.transpose(0, 1).split(rows, dim=0)]


def chunked_logit_losses(spec: LogitLoss, *, student, s_hidden: torch.Tensor, teacher=None,
                         t_hidden: Optional[torch.Tensor] = None, batch: dict, chunk_tokens: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD loss, LM loss), each masked sum / token count, from the final hidden states [s, b, h] of the
    student (and teacher: None for offline top-k or no KD term) and a micro-batch in megatron's [b, s]
    layout (`loss_mask`, `labels`, offline `teacher_topk_*`). `chunk_tokens` 0: the whole micro-batch at
    once, nothing recomputed; else `chunk_tokens` tokens (whole sequence positions of the micro-batch, at
    least one) at a time. Every TP rank runs the same chunks in the same order, forward and recompute
    alike (early stop off), so the collectives inside the loss line up."""
    if spec.kind not in (None, OFFLINE) and t_hidden is None:
        raise MegaslimError(f"logit KD ({spec.kind}) needs the teacher's hidden states")
    mask = batch["loss_mask"]
    count = mask.to(torch.float32).sum().clamp_min(1)
    batch_parts = lambda rows, n: (_chunks(batch.get(k), rows, n, batch_major=True)  # noqa: E731
                                   for k in ("loss_mask", "labels", "teacher_topk_idx", "teacher_topk_logp"))
    if chunk_tokens <= 0:  # one chunk; under sequence parallelism s_hidden is this rank's shard: not split
        kd, lm = _chunk_sums(spec, student, teacher, s_hidden, t_hidden,
                             *(c[0] for c in batch_parts(mask.shape[1], 1)))
        return kd / count, lm / count
    seq, b = s_hidden.shape[:2]
    rows = max(1, chunk_tokens // b)
    n = -(-seq // rows)
    parts = zip(_chunks(s_hidden, rows, n), _chunks(t_hidden, rows, n), *batch_parts(rows, n))
    kd = lm = None
    for s_h, t_h, m, lab, idx, logp in parts:
        kd_c, lm_c = checkpoint(_chunk_sums, spec, student, teacher, s_h, t_h, m, lab, idx, logp,
                                use_reentrant=False, preserve_rng_state=False, early_stop=False)
        kd, lm = (kd_c, lm_c) if kd is None else (kd + kd_c, lm + lm_c)
    return kd / count, lm / count

"""Distillation losses as pure functions (Minitron: logit KD and intermediate-state losses).

Logit losses work on megatron's vocab-parallel logits: the last dim is this TP rank's shard of the
(padded) vocabulary, any leading layout ([s, b, V/TP] or [b, s, V/TP]). Teacher and student shards must
have the same layout. The vocabulary is never gathered: log-softmax uses an all-reduced max and an
all-reduced sum of exponentials, the per-token sum over the vocab is an all-reduce, and top-k exchanges
only k candidates per rank. Every per-token result is replicated on all TP ranks, so a caller reduces it
the same way on every rank and calls backward everywhere (megatron's convention); the student-logit
gradient then lands on each rank's own shard and equals the full-vocab gradient's slice.

Conventions (all kinds): p = teacher, q = student, both softmax(logits / temperature) over the real
vocabulary (padded columns masked out); losses are multiplied by temperature**2 (Hinton) so the gradient
scale does not depend on the temperature. Per-token results are per sample position; `masked_mean` divides
the masked sum by the number of tokens, which for the forward kind gives the reference value
`kl_div(log_q, log_p, log_target=True, reduction='sum') / tokens * tau**2`.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megaslim.errors import MegaslimError
from megaslim.model.logits import mask_padded_vocab

KD_KINDS = ("forward", "reverse", "jsd", "topk")
HIDDEN_KINDS = ("cosine", "mse")
# every `distill.intermediate_loss`: the per-token distances above plus InfoNCE over a micro-batch
INTERMEDIATE_KINDS = HIDDEN_KINDS + ("contrastive",)
# Floor of the detached denominator in dynamic balancing: an intermediate loss that has (almost)
# vanished gets scale logit_loss / BALANCE_EPS instead of a division by ~0 (inf/NaN gradients).
BALANCE_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# tensor-parallel primitives
# --------------------------------------------------------------------------------------------------
def _tp():
    """(group, rank, world size) of the tensor-parallel group; megatron parallel state must be set."""
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_world_size())


class _SumToReplicated(torch.autograd.Function):
    """All-reduce sum whose result is then used identically on every rank (a per-token total).

    Every rank back-propagates the same loss, so the gradient arriving here is already the full one:
    pass it through unchanged (megatron's reduce_from_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumForShards(torch.autograd.Function):
    """All-reduce sum whose result feeds per-shard terms (the softmax normaliser).

    Each rank's downstream terms cover only its vocab shard, so each rank's incoming gradient is a
    partial one: the true gradient is their sum, hence an all-reduce in backward too."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _sum_to_replicated(x: torch.Tensor) -> torch.Tensor:
    group, _, world = _tp()
    return x if world == 1 else _SumToReplicated.apply(x.contiguous(), group)


def _sum_for_shards(x: torch.Tensor) -> torch.Tensor:
    group, _, world = _tp()
    return x if world == 1 else _SumForShards.apply(x.contiguous(), group)


def _global_max(x: torch.Tensor) -> torch.Tensor:
    """Max over the full vocab, keepdim. A constant for gradients: log-softmax is shift invariant."""
    group, _, world = _tp()
    m = x.detach().amax(dim=-1, keepdim=True)
    if world > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return m


def vocab_parallel_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Differentiable log-softmax of a vocab shard over the full (sharded) vocabulary."""
    shifted = logits - _global_max(logits)
    log_z = _sum_for_shards(shifted.exp().sum(dim=-1, keepdim=True)).log()
    return shifted - log_z


@torch.no_grad()
def _log_softmax_no_grad(logits: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """log-softmax over the full (sharded) vocabulary with one new [..., V/TP] tensor: torch's fused kernel
    at TP=1; else the shard minus the global log-normaliser, which only [..., 1] tensors build.
    `inplace`: written into `logits` (a temporary is still made for the normaliser, then freed), so no
    [..., V/TP] tensor outlives the call; for teacher logits made for this loss alone."""
    group, _, world = _tp()
    if world == 1 and not inplace:
        return torch.log_softmax(logits, dim=-1)
    if world == 1:
        return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
    m = _global_max(logits)
    sum_exp = (logits - m).exp_().sum(dim=-1, keepdim=True)  # logits - m: a temporary
    dist.all_reduce(sum_exp, group=group)
    log_z = m + sum_exp.log_()
    return logits.sub_(log_z) if inplace else logits - log_z


class _ForwardKL(torch.autograd.Function):
    """Per-token KL(p || q) from tempered, masked shards; fused so backward keeps one shard tensor.

    d KL / d student_logit_v = q_v - p_v on every rank's own shard: no communication in backward.
    Three [..., V/TP] tensors are made (log p, log q, p), two when the teacher's logits are owned (log p
    then overwrites them); the rest, backward included, is in place (each [tokens, vocab] tensor costs a
    fresh allocation and a full memory pass)."""

    @staticmethod
    def forward(ctx, student, teacher, teacher_owned=False):
        log_p = _log_softmax_no_grad(teacher, inplace=teacher_owned)
        log_q = _log_softmax_no_grad(student)
        p = log_p.exp()
        kl = log_p.sub_(log_q).mul_(p).sum(dim=-1)  # in log p's storage: it is not needed again
        group, _, world = _tp()
        if world > 1:
            dist.all_reduce(kl, group=group)
        ctx.save_for_backward(log_q.exp_().sub_(p))
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        # in place, so the student's logit gradient takes no new [..., V/TP] tensor; a second backward
        # of the same graph (retain_graph) would read the overwritten tensor, hence refused
        if getattr(ctx, "consumed", False):
            raise MegaslimError("the forward-KL loss cannot be back-propagated twice (retain_graph)")
        ctx.consumed = True
        (q_minus_p,) = ctx.saved_tensors
        return q_minus_p.mul_(grad.unsqueeze(-1)), None, None


# --------------------------------------------------------------------------------------------------
# logit KD
# --------------------------------------------------------------------------------------------------
def _check_logits(student: torch.Tensor, teacher: torch.Tensor, vocab_size: int) -> None:
    if student.shape != teacher.shape:
        raise MegaslimError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ: "
            "teacher and student must share the tokenizer, padded vocab size, TP size and layout")
    _, _, world = _tp()
    padded = student.shape[-1] * world
    if not 0 < vocab_size <= padded:
        raise MegaslimError(f"vocab_size={vocab_size} does not fit the logit shards "
                            f"({student.shape[-1]} x TP={world} = {padded} columns)")


def _prepare(logits: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    # float32 at least (bf16 sums over the vocab are too coarse); temperature before masking so the
    # mask value (dtype min) is not divided into -inf, which would give 0 * inf = NaN in p * log p.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    # x / 1.0 == x exactly: skip a [tokens, vocab] copy at the default temperature (callers never write
    # into the result, so sharing the caller's tensor is safe)
    return mask_padded_vocab(logits if temperature == 1 else logits / temperature, vocab_size)


def _reverse_kl(student: torch.Tensor, teacher: torch.Tensor, teacher_owned: bool) -> torch.Tensor:
    log_q = vocab_parallel_log_softmax(student)
    log_p = _log_softmax_no_grad(teacher, inplace=teacher_owned)
    return _sum_to_replicated((log_q.exp() * (log_q - log_p)).sum(dim=-1))


def _jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float, teacher_owned: bool) -> torch.Tensor:
    log_q = vocab_parallel_log_softmax(student)
    log_p = _log_softmax_no_grad(teacher, inplace=teacher_owned)
    # log m through logaddexp: stays finite at padded columns (p = q = 0), where log(0) would give
    # 0 * inf = NaN in p * (log p - log m).
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
    local = beta * (log_p.exp() * (log_p - log_m)) + (1.0 - beta) * (log_q.exp() * (log_q - log_m))
    return _sum_to_replicated(local.sum(dim=-1))


def vocab_parallel_topk(shard: torch.Tensor, k: int, *, start: int, group, world: int):
    """(values, global vocab ids) of the top-k over the TP-sharded vocab, never gathering it: each shard
    proposes its own top-k (k values per rank cross the wire); the global top-k is among these
    candidates. Padded columns sit at dtype min and never win for k <= V."""
    vals, idx = shard.topk(min(k, shard.shape[-1]), dim=-1)
    idx = idx + start
    if world > 1:
        all_vals = [torch.empty_like(vals) for _ in range(world)]
        all_idx = [torch.empty_like(idx) for _ in range(world)]
        dist.all_gather(all_vals, vals.contiguous(), group=group)
        dist.all_gather(all_idx, idx.contiguous(), group=group)
        vals, idx = torch.cat(all_vals, dim=-1), torch.cat(all_idx, dim=-1)
    top_vals, pos = vals.topk(k, dim=-1)
    return top_vals, idx.gather(-1, pos)


def _topk_kl(student: torch.Tensor, teacher: torch.Tensor, k: int) -> torch.Tensor:
    group, rank, world = _tp()
    part = student.shape[-1]
    start = rank * part
    top_vals, top_idx = vocab_parallel_topk(teacher, k, start=start, group=group, world=world)
    # Student logits at the teacher's top-k ids: each rank contributes the ids in its shard; the sum
    # is replicated, so its gradient comes back to the owning shard only.
    local = top_idx - start
    owned = (local >= 0) & (local < part)
    picked = student.gather(-1, local.clamp(0, part - 1))
    s_top = _sum_to_replicated(torch.where(owned, picked, torch.zeros_like(picked)))
    log_p = top_vals.log_softmax(dim=-1)
    log_q = s_top.log_softmax(dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def logit_kd_per_token(*, student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int,
                       kind: str = "forward", temperature: float = 1.0, beta: float = 0.5,
                       top_k: int | None = None, teacher_owned: bool = False) -> torch.Tensor:
    """Per-token logit distillation loss, shape `logits.shape[:-1]`, replicated on every TP rank.

    kind:
      forward  KL(p || q) = sum_v p_v (log p_v - log q_v)   (default; Minitron)
      reverse  KL(q || p)
      jsd      generalized Jensen-Shannon: beta * KL(p || m) + (1 - beta) * KL(q || m) with
               m = beta * p + (1 - beta) * q (the GKD / TRL convention; p teacher, q student);
               0 < beta < 1 (its limits are 0: use forward / reverse for the end points)
      topk     KL(p_k || q_k) over the teacher's top_k tokens per position, both distributions
               renormalised over that set (softmax of the k logits): the tail is ignored
    All kinds are multiplied by temperature**2. Teacher logits are treated as constants (detached).
    `teacher_owned`: the caller hands the teacher logits over (made for this loss alone): they may be
    overwritten by their log-softmax, so one [tokens, vocab/TP] tensor fewer is alive during the loss.
    """
    if kind not in KD_KINDS:
        raise MegaslimError(f"unknown KD loss kind {kind!r}; choose one of {', '.join(KD_KINDS)}")
    if not temperature > 0:
        raise MegaslimError(f"KD temperature must be > 0 (got {temperature})")
    _check_logits(student_logits, teacher_logits, vocab_size)
    s = _prepare(student_logits, temperature, vocab_size)
    t = _prepare(teacher_logits.detach(), temperature, vocab_size)
    if kind == "forward":
        loss = _ForwardKL.apply(s, t, teacher_owned)
    elif kind == "reverse":
        loss = _reverse_kl(s, t, teacher_owned)
    elif kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise MegaslimError(f"JSD beta must be in (0, 1) (got {beta}); beta at 0 or 1 makes the "
                                "loss vanish, use kind='forward' or 'reverse' instead")
        loss = _jsd(s, t, beta, teacher_owned)
    else:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_size:
            raise MegaslimError(f"top-k KD needs an integer top_k in [1, vocab_size={vocab_size}] "
                                f"(got {top_k!r})")
        loss = _topk_kl(s, t, top_k)
    return loss * temperature ** 2


def masked_sum_and_count(per_token: torch.Tensor,
                         loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token losses over the mask, number of tokens): for callers that normalise by the
    token count of a whole global batch (micro-batches, DP) instead of per micro-batch."""
    if loss_mask.shape != per_token.shape:
        raise MegaslimError(f"loss_mask {tuple(loss_mask.shape)} does not match the per-token loss "
                            f"{tuple(per_token.shape)} (same layout as the logits without the vocab dim)")
    mask = loss_mask.to(per_token.dtype)
    return (per_token * mask).sum(), mask.sum()


def masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum over the masked tokens / number of tokens (0 when the mask is empty, not NaN)."""
    total, count = masked_sum_and_count(per_token, loss_mask)
    return total / count.clamp_min(1)


def logit_kd_loss(*, student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_mask: torch.Tensor,
                  vocab_size: int, kind: str = "forward", temperature: float = 1.0, beta: float = 0.5,
                  top_k: int | None = None) -> torch.Tensor:
    """Scalar logit KD loss: masked sum of `logit_kd_per_token` / number of tokens.

    `loss_mask` has the logits' layout without the vocab dim ([b, s] for megatron's [b, s, V/TP])."""
    per_token = logit_kd_per_token(student_logits=student_logits, teacher_logits=teacher_logits,
                                   vocab_size=vocab_size, kind=kind, temperature=temperature, beta=beta,
                                   top_k=top_k)
    return masked_mean(per_token, loss_mask)


# --------------------------------------------------------------------------------------------------
# intermediate-state losses
# --------------------------------------------------------------------------------------------------
class HiddenProjection(nn.Linear):
    """Learned map from the student's hidden width to the teacher's (Minitron's intermediate loss).

    Identity-initialised when the widths are equal, so the loss starts as the plain state distance.
    Otherwise nn.Linear's default init (uniform in +-1/sqrt(student_hidden)); with `seed` that init
    comes from its own generator and leaves the global RNG untouched, so every rank that builds it with
    the same seed holds the same weights (a TP/DP-replicated parameter) whatever ran before.
    Its parameters are trained with the student: add them to the student's optimizer."""

    def __init__(self, student_hidden: int, teacher_hidden: int, *, bias: bool = False,
                 seed: int | None = None):
        if seed is None:
            super().__init__(student_hidden, teacher_hidden, bias=bias)
        else:
            with torch.random.fork_rng(devices=[]):  # nn.Linear's own init must not move the global RNG
                super().__init__(student_hidden, teacher_hidden, bias=bias, device="cpu")
        with torch.no_grad():
            if student_hidden == teacher_hidden:
                self.weight.copy_(torch.eye(teacher_hidden))
                if self.bias is not None:
                    self.bias.zero_()
            elif seed is not None:
                g = torch.Generator().manual_seed(seed)
                bound = 1.0 / math.sqrt(student_hidden)
                self.weight.copy_(torch.rand(self.weight.shape, generator=g) * 2 * bound - bound)
                if self.bias is not None:
                    self.bias.copy_(torch.rand(self.bias.shape, generator=g) * 2 * bound - bound)


def full_sequence(hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """A layer's output [s, b, h] whole on every TP rank. Under sequence parallelism each rank holds its
    [s/TP, b, h] shard: all-gathered along the sequence, the gradient split back to each rank's shard
    (megatron's gather_from_sequence_parallel_region without the reduce-scatter: every rank then computes
    the same loss on the same states and back-propagates the same full gradient, as for the logit loss),
    so intermediate losses, their projection's gradient included, are the TP=1 ones."""
    if not sequence_parallel:
        return hidden
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)


def _projected_pair(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                    projection: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape-checked [s, b, h] states in (at least) float32: the student's through `projection`, the
    teacher's detached (a constant)."""
    if (student_hidden.dim() != 3 or teacher_hidden.dim() != 3
            or student_hidden.shape[:2] != teacher_hidden.shape[:2]):
        raise MegaslimError(f"hidden states must be [s, b, h] with equal s, b (student "
                            f"{tuple(student_hidden.shape)}, teacher {tuple(teacher_hidden.shape)})")
    s = student_hidden
    if projection is not None:
        weight = next(projection.parameters(), None)
        s = projection(s if weight is None else s.to(weight.dtype))
    if s.shape[-1] != teacher_hidden.shape[-1]:
        raise MegaslimError(f"student width {s.shape[-1]} != teacher width {teacher_hidden.shape[-1]}: "
                            "pass a HiddenProjection(student_hidden, teacher_hidden)")
    dtype = torch.promote_types(s.dtype, torch.float32)
    return s.to(dtype), teacher_hidden.detach().to(dtype)


def hidden_state_loss_per_token(*, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                                projection: nn.Module | None = None, kind: str = "cosine") -> torch.Tensor:
    """Per-token distance between student [s, b, h_s] and teacher [s, b, h_t] states, shape [b, s]
    (megatron's loss_mask layout).

    cosine: 1 - cos(proj(student), teacher);  mse: mean over the teacher width of
    (proj(student) - teacher)**2 (a mean, so the scale does not grow with the width). The projection is
    required when the widths differ; the teacher is a constant."""
    if kind not in HIDDEN_KINDS:
        raise MegaslimError(f"unknown intermediate loss kind {kind!r}; "
                            f"choose one of {', '.join(HIDDEN_KINDS)}")
    s, t = _projected_pair(student_hidden, teacher_hidden, projection)
    if kind == "cosine":
        per_token = 1.0 - nn.functional.cosine_similarity(s, t, dim=-1)
    else:
        per_token = (s - t).pow(2).mean(dim=-1)
    return per_token.transpose(0, 1)


def hidden_state_loss(*, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, loss_mask: torch.Tensor,
                      projection: nn.Module | None = None, kind: str = "cosine") -> torch.Tensor:
    """Scalar intermediate-state loss over the masked tokens; `loss_mask` is [b, s] (megatron)."""
    per_token = hidden_state_loss_per_token(student_hidden=student_hidden, teacher_hidden=teacher_hidden,
                                            projection=projection, kind=kind)
    return masked_mean(per_token, loss_mask)


def contrastive_loss(*, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, loss_mask: torch.Tensor,
                     projection: nn.Module | None = None, temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE between projected student states and teacher states of one micro-batch.

    Student [s, b, h_s] and teacher [s, b, h_t] states, `loss_mask` [b, s] (megatron). The N valid
    positions (mask > 0, over all samples of the micro-batch) give unit vectors s_i = proj(student_i)
    / |.| and t_j = teacher_j / |.|; logits_ij = <s_i, t_j> / temperature; the loss is the
    cross-entropy of row i with target j = i, averaged over the N rows: each student position must pick
    its own teacher position among all the micro-batch's positions (the others are the negatives).
    The teacher is a constant. An empty mask gives 0 (still connected to the graph). Positions with
    identical teacher states (the same token at position 0 of two rows) are indistinguishable
    negatives; that is inherent to InfoNCE over token positions.

    Cost: the N x N similarity matrix (N = s * b valid positions) is quadratic in the micro-batch's
    token count: 8 x 4096 tokens is 2**30 logits (4 GiB in float32, twice with its gradient), so keep
    the micro-batch small, as a distillation micro-batch usually is."""
    if not temperature > 0:
        raise MegaslimError(f"contrastive temperature must be > 0 (got {temperature})")
    s, t = _projected_pair(student_hidden, teacher_hidden, projection)
    seq, batch = s.shape[:2]
    if tuple(loss_mask.shape) != (batch, seq):
        raise MegaslimError(f"loss_mask {tuple(loss_mask.shape)} does not match the hidden states: "
                            f"expected [b, s] = {(batch, seq)}")
    # [s, b, h] -> [b * s, h], row order matching loss_mask.reshape(-1)
    s, t = s.transpose(0, 1).reshape(batch * seq, -1), t.transpose(0, 1).reshape(batch * seq, -1)
    valid = loss_mask.reshape(-1) > 0
    if not bool(valid.any()):
        return s.sum() * 0.0
    s = nn.functional.normalize(s[valid], dim=-1)
    t = nn.functional.normalize(t[valid], dim=-1)
    logits = s @ t.t() / temperature  # [N, N]: quadratic in the number of positions (see above)
    target = torch.arange(logits.shape[0], device=logits.device)
    return nn.functional.cross_entropy(logits, target)


def intermediate_loss(*, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, loss_mask: torch.Tensor,
                      projection: nn.Module | None = None, kind: str = "cosine",
                      temperature: float = 0.1) -> torch.Tensor:
    """Scalar loss of one intermediate pair for `distill.intermediate_loss`: `hidden_state_loss` for
    cosine | mse, `contrastive_loss` (with `temperature`) for contrastive."""
    if kind not in INTERMEDIATE_KINDS:
        raise MegaslimError(f"unknown intermediate loss kind {kind!r}; "
                            f"choose one of {', '.join(INTERMEDIATE_KINDS)}")
    if kind == "contrastive":
        return contrastive_loss(student_hidden=student_hidden, teacher_hidden=teacher_hidden,
                                loss_mask=loss_mask, projection=projection, temperature=temperature)
    return hidden_state_loss(student_hidden=student_hidden, teacher_hidden=teacher_hidden, loss_mask=loss_mask,
                             projection=projection, kind=kind)


def _layer_index(value, n: int, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MegaslimError(f"intermediate_layer_pairs: {who} layer {value!r} is not an integer")
    if not -n <= value < n:
        raise MegaslimError(f"intermediate_layer_pairs: {who} layer {value} is out of range: the {who} "
                            f"has {n} layers (0..{n - 1}, or -1 for the last)")
    return value % n


def intermediate_layer_pairs(*, student_layers: int, teacher_layers: int,
                             pairs: Iterable[Sequence[int]] | None = None,
                             num_pairs: int | None = None) -> list[tuple[int, int]]:
    """[(student_layer, teacher_layer), ...], 0-based indices of `decoder.layers` (negative ones count
    from the end and are normalised).

    `pairs` given: validated and returned. Otherwise the default for a depth-pruned student: `num_pairs`
    student layers (default all), evenly spaced and ending at the last, each mapped to the teacher
    layer at the same relative depth, ceil((i + 1) * L_t / L_s) - 1: the student's last layer meets
    the teacher's last. Pairs crossing pipeline stages are the training loop's to refuse."""
    for n, who in ((student_layers, "student"), (teacher_layers, "teacher")):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise MegaslimError(f"intermediate_layer_pairs: {who} layer count must be >= 1 (got {n!r})")
    if pairs is not None:
        out = []
        for pair in pairs:
            if isinstance(pair, (str, bytes)) or len(pair) != 2:
                raise MegaslimError(f"intermediate_layer_pairs: {pair!r} is not a [student_layer, "
                                    "teacher_layer] pair")
            out.append((_layer_index(pair[0], student_layers, "student"),
                        _layer_index(pair[1], teacher_layers, "teacher")))
        if len(set(out)) != len(out):
            raise MegaslimError(f"intermediate_layer_pairs: duplicate pairs in {out}")
        return out
    n = student_layers if num_pairs is None else num_pairs
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= student_layers:
        raise MegaslimError(f"intermediate_layer_pairs: num_pairs must be in [1, {student_layers}] "
                            f"(got {num_pairs!r})")
    students = [(j + 1) * student_layers // n - 1 for j in range(n)]
    # -(-a // b) is ceil(a / b) in integers.
    return [(i, -(-(i + 1) * teacher_layers // student_layers) - 1) for i in students]


# --------------------------------------------------------------------------------------------------
# balancing and the total
# --------------------------------------------------------------------------------------------------
def balance_to_logit_loss(loss: torch.Tensor, *, logit_loss: torch.Tensor,
                          eps: float = BALANCE_EPS) -> torch.Tensor:
    """`loss * (logit_loss / loss)` with the ratio detached (Minitron / NeMo dynamic balancing).

    The value equals the logit loss, the gradient is loss's scaled by the ratio, so every intermediate
    term pulls with the strength of the logit term whatever its natural scale. The denominator is
    floored at `eps` (see BALANCE_EPS)."""
    return loss * (logit_loss.detach() / loss.detach().clamp_min(eps))


def combine_losses(*, kd_loss: torch.Tensor, lm_loss: torch.Tensor | None = None,
                   intermediate: Mapping[str, torch.Tensor] | None = None, kd_loss_scale: float = 1.0,
                   skip_lm_loss: bool = True, balance: bool = True,
                   eps: float = BALANCE_EPS) -> dict[str, torch.Tensor]:
    """Total loss and detached components for logging.

    loss = kd_loss_scale * kd_loss + (0 if skip_lm_loss else lm_loss) + sum of the intermediate terms,
    each balanced to kd_loss (unscaled) when `balance` and there is a logit term (kd_loss_scale != 0);
    with kd_loss_scale == 0 ("intermediate only", or LM + intermediate) there is no logit loss to
    balance to and the intermediate terms enter as they are. Keys: "loss" (differentiable), "kd_loss",
    "lm_loss" (when given, logged even if skipped), and each intermediate name with its raw value."""
    balance = balance and kd_loss_scale != 0
    total = kd_loss_scale * kd_loss
    out = {"kd_loss": kd_loss.detach()}
    if lm_loss is not None:
        out["lm_loss"] = lm_loss.detach()
    if not skip_lm_loss:
        if lm_loss is None:
            raise MegaslimError("skip_lm_loss is false but no LM loss was given")
        total = total + lm_loss
    for name, value in (intermediate or {}).items():
        if name in ("loss", "kd_loss", "lm_loss"):
            raise MegaslimError(f"intermediate loss name {name!r} clashes with a reserved key")
        total = total + (balance_to_logit_loss(value, logit_loss=kd_loss, eps=eps) if balance else value)
        out[name] = value.detach()
    out["loss"] = total
    return out

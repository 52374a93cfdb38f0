"""Rotary position embedding for megatron's unfused path as one autograd op, bit-equal to megatron's.

megatron-core's `_apply_rotary_pos_emb_bshd` (used whenever `apply_rope_fusion` is off: the local spec,
every CPU run) recomputes cos/sin of the frequencies for every call (query and key of every layer),
multiplies them by mscale, slices off an empty pass-through part, and builds rotate_half with chunk + neg
+ cat, then a final cat with the empty part: ~8 passes over q/k forward and as many again in backward
(chunk's backward is a cat, the slices' backward zero-filled copies). Here the same per-element arithmetic
runs in one autograd Function over the two halves (x1*c1 - x2*s1, x2*c2 + x1*s2; backward g1*c1 + g2*s2,
g2*c2 - g1*s1), with cos/sin computed once per frequency tensor (megatron caches that tensor per sequence
length, so it is the same object for every layer and step). a + (-b) == a - b and (-a)*b == -(a*b) in
IEEE arithmetic, so outputs and gradients equal megatron's bit for bit (tests/test_sdpa_attention.py).

Only the plain case takes this path (bshd, no fusion, not interleaved, no MLA, rotary dim == head dim);
everything else calls megatron's own function. Installed for the local spec only (`install`): Transformer
Engine specs keep megatron's code as it is.
"""
from __future__ import annotations

import torch

_CACHE_SIZE = 8  # (freqs, dtype, mscale) entries: a teacher and a student, train and eval lengths


class _CosSinCache:
    """cos/sin of a frequency tensor, computed as megatron does ((cos(f) * mscale).to(dtype)), per tensor."""

    def __init__(self):
        self.entries: list[tuple] = []  # (freqs, freqs._version, dtype, mscale, cos, sin)

    def get(self, freqs: torch.Tensor, dtype: torch.dtype, mscale: float):
        for f, version, dt, ms, cos, sin in self.entries:
            if f is freqs and version == freqs._version and dt == dtype and ms == mscale:
                return cos, sin
        with torch.no_grad():
            cos = (torch.cos(freqs) * mscale).to(dtype)
            sin = (torch.sin(freqs) * mscale).to(dtype)
        # the entry holds the frequency tensor itself, so an id can never be reused by another tensor
        self.entries = [(freqs, freqs._version, dtype, mscale, cos, sin), *self.entries[:_CACHE_SIZE - 1]]
        return cos, sin


_COS_SIN = _CosSinCache()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (sign=1; forward), or its transpose (sign=-1; backward), into a new
    contiguous tensor (megatron's final cat is contiguous too, so later ops see the same strides)."""
    h = x.shape[-1] // 2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    if sign > 0:  # o1 = x1*c1 + (-x2)*s1, o2 = x2*c2 + x1*s2
        torch.mul(x1, cos[..., :h], out=o1).sub_(x2 * sin[..., :h])
        torch.mul(x2, cos[..., h:], out=o2).add_(x1 * sin[..., h:])
    else:  # dx1 = g1*c1 + g2*s2, dx2 = g2*c2 + (-(g1*s1))
        torch.mul(x1, cos[..., :h], out=o1).add_(x2 * sin[..., h:])
        torch.mul(x2, cos[..., h:], out=o2).sub_(x1 * sin[..., :h])
    return out


class _ApplyRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(t, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def _plain(t: torch.Tensor, freqs: torch.Tensor, config, cu_seqlens) -> bool:
    """The case megatron sends to `_apply_rotary_pos_emb_bshd` with nothing to pass through."""
    return (cu_seqlens is None and not config.apply_rope_fusion and not config.rotary_interleaved
            and not config.multi_latent_attention and not freqs.requires_grad
            and freqs.shape[-1] == t.shape[-1] and t.shape[-1] % 2 == 0 and t.is_floating_point())


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    """megatron's `_apply_rotary_pos_emb_bshd(t, freqs, mscale=mscale)` for rotary dim == t's last dim."""
    cos, sin = _COS_SIN.get(freqs, t.dtype, mscale)
    return _ApplyRotary.apply(t, cos, sin)


def install() -> None:
    """Route megatron attention's `apply_rotary_pos_emb` through `apply_rotary` in the plain case (idempotent;
    `apply_rotary_pos_emb.original` is megatron's function)."""
    from megatron.core.transformer import attention

    current = attention.apply_rotary_pos_emb
    if getattr(current, "original", None) is not None:
        return

    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None, **kwargs):
        if not kwargs and _plain(t, freqs, config, cu_seqlens):
            return apply_rotary(t, freqs, mscale)
        return current(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group, **kwargs)

    apply_rotary_pos_emb.original = current
    attention.apply_rotary_pos_emb = apply_rotary_pos_emb

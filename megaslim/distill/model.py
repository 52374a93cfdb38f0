"""Teacher + student in one module for megatron's pipeline schedules.

Under PP every stage runs its teacher stage and its student stage; the activation sent between stages
is [student | teacher] concatenated along the hidden dim (p2p shapes widened by
`adjust_tensor_shapes`), as ModelOpt does. The teacher is frozen: eval mode, no grads, no optimizer.

`teacher=None` runs the student alone (offline teacher logits, or LM-only training on synthetic data):
the last stage then returns `(student_logits, None)` and no p2p widening is needed.
`hidden_out=True` (chunked logit losses, `megaslim.distill.chunked`): the last stage returns both models'
final hidden states [s, b, h] instead of their logits; the loss runs the output layers chunk by chunk.
`fp8` (a `megaslim.distill.fp8.Fp8Context`) runs both forwards of a micro-batch in one FP8 autocast
region; the student's FP8 weight cache is refreshed at the first micro-batch of each step (megatron's
schedules call `set_is_first_microbatch`), the frozen teacher's is made once and reused.
"""
from __future__ import annotations

import contextlib

import torch

from megaslim.distill.chunked import final_hidden_states
from megaslim.distill.fp8 import reset_weight_cache


class DistillModel(torch.nn.Module):
    def __init__(self, student_ddp, teacher, *, fp8=None, hidden_out: bool = False):
        super().__init__()
        self.module = student_ddp  # megatron's get_attr_wrapped_model walks `.module`
        self.teacher = teacher
        self.config = student_ddp.config
        self.h_s = student_ddp.module.config.hidden_size
        self.h_t = teacher.config.hidden_size if teacher is not None else 0
        self.fp8 = fp8
        self.hidden_out = hidden_out
        self._teacher_fp8_cached = False
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    @property
    def student(self):
        return self.module.module

    def set_input_tensor(self, input_tensor) -> None:
        t = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
        if self.teacher is None:
            self.student.set_input_tensor(t)
            return
        if t is None:
            self.student.set_input_tensor(None)
            self.teacher.set_input_tensor(None)
            return
        self.student.set_input_tensor(t[..., :self.h_s])
        self.teacher.set_input_tensor(t[..., self.h_s:].detach())

    def set_is_first_microbatch(self) -> None:
        """Called by megatron's schedules at the first micro-batch of a step: the student's weights
        changed since the last step, so its FP8 weight casts must be redone."""
        if self.fp8 is not None:
            reset_weight_cache(self.student)

    def _heads_off(self, last: bool):
        """Both models stop before their output layers (hidden_out on the last stage), else a no-op."""
        stack = contextlib.ExitStack()
        if self.hidden_out and last:
            stack.enter_context(final_hidden_states(self.student))
            if self.teacher is not None:
                stack.enter_context(final_hidden_states(self.teacher))
        return stack

    def forward(self, tokens, position_ids, attention_mask=None):
        fp8_region = self.fp8() if self.fp8 is not None else contextlib.nullcontext()
        last = self.student.post_process
        with fp8_region, self._heads_off(last):
            t_out = None
            if self.teacher is not None:
                if self.fp8 is not None and not self._teacher_fp8_cached:
                    reset_weight_cache(self.teacher)  # cast once under FP8; reused afterwards
                    self._teacher_fp8_cached = True
                with torch.no_grad():
                    t_out = self.teacher(tokens, position_ids, attention_mask)
            s_out = self.module(tokens, position_ids, attention_mask)
        if last:
            # vocab-parallel logits [b, s, V/TP] of both (teacher: None if absent); hidden_out: the
            # final hidden states [s, b, h] instead
            return s_out, t_out
        if t_out is None:
            return s_out
        return torch.cat([s_out, t_out.detach()], -1)

    def adjust_tensor_shapes(self, recv_shapes, send_shapes):
        """Widen megatron's p2p shapes (s, b, h_student) to (s, b, h_student + h_teacher)."""
        widen = lambda shapes: [(s[0], s[1], s[2] + self.h_t) if s is not None else None for s in shapes]  # noqa: E731
        return widen(recv_shapes), widen(send_shapes)

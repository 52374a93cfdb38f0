"""Teacher + student in one module for megatron's pipeline schedules.

Under PP every stage runs its teacher stage and its student stage; the activation sent between stages
is [student | teacher] concatenated along the hidden dim (p2p shapes widened by
`adjust_tensor_shapes`), as ModelOpt does. The teacher is frozen: eval mode, no grads, no optimizer.
"""
from __future__ import annotations

import torch


class DistillModel(torch.nn.Module):
    def __init__(self, student_ddp, teacher, *, capture: dict | None = None):
        super().__init__()
        self.module = student_ddp  # megatron's get_attr_wrapped_model walks `.module`
        self.teacher = teacher
        self.config = student_ddp.config
        self.h_s = student_ddp.module.config.hidden_size
        self.h_t = teacher.config.hidden_size
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    @property
    def student(self):
        return self.module.module

    def set_input_tensor(self, input_tensor) -> None:
        t = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
        if t is None:
            self.student.set_input_tensor(None)
            self.teacher.set_input_tensor(None)
            return
        self.student.set_input_tensor(t[..., :self.h_s])
        self.teacher.set_input_tensor(t[..., self.h_s:].detach())

    def forward(self, tokens, position_ids, attention_mask=None):
        with torch.no_grad():
            t_out = self.teacher(tokens, position_ids, attention_mask)
        s_out = self.module(tokens, position_ids, attention_mask)
        if self.student.post_process:
            return s_out, t_out  # vocab-parallel logits [b, s, V/TP] of both
        return torch.cat([s_out, t_out.detach()], -1)

    def adjust_tensor_shapes(self, recv_shapes, send_shapes):
        """Widen megatron's p2p shapes (s, b, h_student) to (s, b, h_student + h_teacher)."""
        widen = lambda shapes: [(s[0], s[1], s[2] + self.h_t) if s is not None else None for s in shapes]  # noqa: E731
        return widen(recv_shapes), widen(send_shapes)

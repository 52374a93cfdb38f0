"""Teacher + student in one module for megatron's pipeline schedules.

Under PP every stage runs its teacher stage and its student stage; the activation sent between stages
is [student | teacher] concatenated along the hidden dim (p2p shapes widened by
`adjust_tensor_shapes`), as ModelOpt does. The teacher is frozen: eval mode, no grads, no optimizer.

`teacher=None` runs the student alone (offline teacher logits, or LM-only training on synthetic data):
the last stage then returns `(student_logits, None)` and no p2p widening is needed.
`hidden_out=True` (the trainer's setting; `megaslim.distill.chunked`): the last stage returns both models'
final hidden states [s, b, h] instead of their logits; the loss runs the output layers, whole or by chunks.
`fp8` (a `megaslim.distill.fp8.Fp8Context`) runs both forwards of a micro-batch in one FP8 autocast
region; the student's FP8 weight cache is refreshed at the first micro-batch of each step (megatron's
schedules call `set_is_first_microbatch`), the frozen teacher's is made once and reused.
`RouterAuxLoss`: an MoE student's load-balancing loss coefficient, and its per-step values (docs/moe.md).
"""
from __future__ import annotations

import contextlib

import torch

from megaslim.distill.chunked import final_hidden_states
from megaslim.distill.fp8 import reset_weight_cache
from megaslim.errors import MegaslimError
from megaslim.runtime import ParallelLayout


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


# -- the student router's load-balancing loss (MoE students) ----------------------------------------
# megatron-core's router adds its aux loss to the gradient inside its own forward (MoEAuxLossAutoScaler:
# the loss rides on the routing probabilities, its backward scale set by the pipeline schedule to
# grad_scale / num_microbatches), so the KD loss never contains it; it only records the unscaled value per
# layer in a process-global tracker. The teacher never adds to it: eval mode under no_grad skips both the
# aux and the z-loss (router.py: `self.training and torch.is_grad_enabled()`).
_TRACKED = {"load_balancing_loss": "moe_aux_loss", "z_loss": "moe_z_loss"}  # megatron name -> metrics key


class RouterAuxLoss:
    """The aux-loss coefficient applied to an MoE student (`distill.moe_aux_loss_coeff`; unset: the
    student's own, HF `router_aux_loss_coef`; 0: off) and the per-step values read back from megatron."""

    def __init__(self, student, coeff: float):
        from megatron.core.transformer.moe.router import TopKRouter

        self.coeff = float(coeff)
        self.num_layers = student.config.num_layers  # every layer is an MoE layer (docs/moe.md)
        kind = "aux_loss" if self.coeff else "none"
        for m in student.modules():
            if isinstance(m, TopKRouter):  # the router reads both at every forward (routing_type: at build)
                m.config.moe_aux_loss_coeff, m.config.moe_router_load_balancing_type = self.coeff, kind
                m.routing_type = kind
        student.config.moe_aux_loss_coeff, student.config.moe_router_load_balancing_type = self.coeff, kind

    @classmethod
    def for_student(cls, student, arch, coeff) -> "RouterAuxLoss | None":
        """None for a dense student; `coeff` None keeps the arch's coefficient."""
        if not arch.is_moe:
            return None
        return cls(student, arch.moe_aux_loss_coeff if coeff is None else coeff)

    @property
    def kept(self) -> bool:
        return self.coeff > 0

    def describe(self) -> str:
        return f"coeff {self.coeff:g} ({'kept' if self.kept else 'off'})"

    def check_resume(self, extra: dict, root) -> None:
        """A run resumes with the coefficient it was saved with (checkpoint extra `moe_aux_loss_coeff`)."""
        saved = extra.get("moe_aux_loss_coeff")
        if saved is not None and float(saved) != self.coeff:
            raise MegaslimError(f"resume: {root} was trained with the router aux-loss coefficient {saved:g}, this "
                                f"config gives {self.coeff:g}; set distill.moe_aux_loss_coeff={saved:g} or use "
                                "another output_dir")

    @staticmethod
    def clear() -> None:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()

    def metrics(self, num_micro: int) -> dict:
        """This step's values, the same on every rank: per MoE layer and micro-batch, averaged over DP
        (megatron's logging convention); summed over PP stages (each holds its own layers). Over TP as
        megatron reduces them (reduce_aux_losses_tracker_across_ranks), which gives the TP=1 value with or
        without sequence parallelism: a loss recorded with a `reduce_group` (the load-balancing loss: each
        TP rank's share, its routing counts all-reduced over TP) is summed, one without (the z-loss: a mean
        over this rank's tokens, all of them or its sequence shard) is averaged. Collective."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        dp, tp = ps.get_data_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
        vec = torch.zeros(2 * len(_TRACKED), dtype=torch.float64)
        for i, name in enumerate(_TRACKED):
            entry = tracker.get(name)
            if entry is None:
                continue
            tp_share = 1 if entry.get("reduce_group") is not None else tp
            vec[2 * i] = entry["values"].double().sum().cpu() / (self.num_layers * num_micro * dp * tp_share)
            vec[2 * i + 1] = 1.0
        vec = ParallelLayout.all_reduce(vec)  # the world: sums the PP stages, the DP/TP shares above
        self.clear()
        return {key: vec[2 * i].item() for i, key in enumerate(_TRACKED.values()) if vec[2 * i + 1] > 0}

"""The distillation loop: megatron pipeline schedules, megatron's optimizer and LR scheduler,
periodic evaluation, metrics, checkpoints with full resume state."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megaslim import checkpoint as ckpt
from megaslim import io as mio
from megaslim.config import Config
from megaslim.distill import chunked, fp8, losses
from megaslim.distill.model import DistillModel, RouterAuxLoss
from megaslim.errors import MegaslimError
from megaslim.eval import evaluate_rows
from megaslim.figures import pyplot, save_png
from megaslim.model.arch import ModelArch
from megaslim.model.compat import prepare_distributed_optimizer_for_load, unshare_adam_steps
from megaslim.sparsity.apply import MASKS_KEY
from megaslim.sparsity.train import MaskKeeper, check_resume


@dataclass
class Models:
    student: object  # GPTModel (this rank's shard)
    student_arch: ModelArch
    teacher: object  # GPTModel, or None when distilling from offline teacher logits
    teacher_arch: ModelArch  # with offline logits: the arch recorded with them


class _Capture:
    """Forward hooks keeping the output hidden states of chosen layers (for intermediate losses)."""

    def __init__(self, model, layers: list[int]):
        self.states: dict[int, torch.Tensor] = {}
        self.handles = []
        local = {layer.layer_number - 1: layer for layer in model.decoder.layers}
        for i in layers:
            self.handles.append(local[i].register_forward_hook(
                lambda m, a, out, i=i: self.states.__setitem__(i, out[0] if isinstance(out, tuple) else out)))

    def remove(self):
        for h in self.handles:
            h.remove()


def resolve_pairs(cfg: Config, student_arch: ModelArch, teacher_arch: ModelArch, pp: int) -> list[tuple[int, int]]:
    """Intermediate pairs, validated: both layers must live on the last pipeline stage (the loss is
    computed there). Across hidden widths the student's states go through the learned projection
    (`needs_projection`)."""
    if not cfg.distill.intermediate_layer_pairs:
        return []
    pairs = losses.intermediate_layer_pairs(student_layers=student_arch.num_layers,
                                            teacher_layers=teacher_arch.num_layers,
                                            pairs=cfg.distill.intermediate_layer_pairs)
    s_first = student_arch.num_layers - student_arch.num_layers // pp
    t_first = teacher_arch.num_layers - teacher_arch.num_layers // pp
    crossing = [(s, t) for s, t in pairs if s < s_first or t < t_first]
    if crossing:
        raise MegaslimError(
            f"distill.intermediate_layer_pairs {crossing} are not on the last pipeline stage (student "
            f"layers >= {s_first}, teacher layers >= {t_first} at PP={pp}); losses are computed there")
    return pairs


# -- the learned projection of intermediate losses (student hidden -> teacher hidden) ------------------
# One Linear(student_hidden, teacher_hidden, bias=False) shared by every pair (Minitron: one linear
# transform across layers), used when the widths differ and always for `contrastive`. It lives on the
# last pipeline stage (where the losses are) and is registered on the student only while megatron's DDP
# and optimizer are built, so it sits in their grad buffers (DP all-reduce, distributed optimizer) and
# param groups; then it is taken off the student, so it is never a model weight (checkpoint "model"
# state, HF export, gather_full_state). Checkpoints carry it beside the optimizer state
# (sharded_extra "distill_projection") so a resume restores it; later loaders never read it.
PROJECTION = "distill_projection"


def needs_projection(cfg: Config, student_arch: ModelArch, teacher_arch: ModelArch) -> bool:
    d = cfg.distill
    return bool(d.intermediate_layer_pairs) and (
        d.intermediate_loss == "contrastive" or student_arch.hidden_size != teacher_arch.hidden_size)


def attach_projection(cfg: Config, models: Models) -> Optional[losses.HiddenProjection]:
    """This rank's projection (None where unused or off the last stage), registered on the student.
    Seeded from train.seed: identical on every TP/DP rank (a replicated parameter; its gradient is the
    same on every TP rank because the layer outputs and the loss are replicated: under sequence
    parallelism the losses gather the layer outputs first, `losses.full_sequence`)."""
    from megatron.core import parallel_state as ps

    if not (needs_projection(cfg, models.student_arch, models.teacher_arch) and ps.is_pipeline_last_stage()):
        return None
    ref = next(models.student.parameters())
    proj = losses.HiddenProjection(models.student_arch.hidden_size, models.teacher_arch.hidden_size,
                                   seed=cfg.train.seed).to(device=ref.device, dtype=ref.dtype)
    models.student.add_module(PROJECTION, proj)
    return proj


def check_projection_resume(extra: dict, needed: bool, root) -> None:
    """A run resumes with the projection it was saved with (recorded in the checkpoint's extra)."""
    saved = bool(extra.get("projection", False))
    if saved != needed:
        raise MegaslimError(
            f"resume: {root} was written {'with' if saved else 'without'} the learned intermediate-loss "
            f"projection and this config {'needs one' if needed else 'uses none'}; resume with the same "
            "distill.intermediate_layer_pairs / intermediate_loss, or use another output_dir")


def pair_metric_key(kind: str, s: int, t: int) -> str:
    """metrics key of one intermediate pair: hidden_{s}_{t} (cosine | mse), contrastive_{s}_{t}."""
    return f"{'contrastive' if kind == 'contrastive' else 'hidden'}_{s}_{t}"


def finite_or_raise(value: float, step: int, ckpt_root: Path) -> None:
    """Stop a run whose loss is no longer finite, naming its last good checkpoint."""
    if not math.isfinite(value):
        last = ckpt.latest_iteration(ckpt_root) if ckpt_root.exists() else None
        raise MegaslimError(f"non-finite loss ({value}) at step {step}; stopping. Last good checkpoint: "
                            f"{ckpt_root / ckpt.iter_name(last) if last is not None else 'none'}")


def lm_only(cfg: Config) -> bool:
    """Plain LM training (e.g. on synthetic data): no KD term, no intermediate pairs, LM loss on.
    The teacher's forward is then skipped (it would be multiplied by 0)."""
    d = cfg.distill
    return d.kd_loss_scale == 0 and not d.intermediate_layer_pairs and not d.skip_lm_loss


def logit_loss_spec(cfg: Config, student_arch: ModelArch, *, offline: bool, lm_only: bool) -> chunked.LogitLoss:
    """The logit terms of a run: offline top-k, the `distill.kl` kind, or none (LM-only); the LM loss
    unless `distill.skip_lm_loss`."""
    d = cfg.distill
    kind = chunked.OFFLINE if offline else (None if lm_only else str(d.kl))
    return chunked.LogitLoss(vocab_size=student_arch.vocab_size, kind=kind, temperature=d.logit_kl_temperature,
                             beta=d.jsd_beta, top_k=d.top_k, lm=not d.skip_lm_loss)


class Trainer:
    """One distillation run's optimizer, scheduler, checkpoints and steps.

    Modes (decided from the config and `offline`): online KD (teacher forward every micro-batch),
    offline KD (`offline=True`: the teacher's stored top-k arrives in each micro-batch as
    `teacher_topk_idx`/`teacher_topk_logp`, no teacher model), LM-only (`lm_only(cfg)`). FP8 when
    `distill.fp8` is set (validated beforehand by `megaslim.distill.fp8.check_fp8`)."""

    def __init__(self, cfg: Config, models: Models, *, tokenizer_dir, eval_rows: Optional[torch.Tensor],
                 offline: bool = False, student_checkpoint=None):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.cfg, self.models, self.tokenizer_dir, self.eval_rows = cfg, models, tokenizer_dir, eval_rows
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoint"
        self.dp = ps.get_data_parallel_world_size()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        t = cfg.train
        self.num_micro = t.global_batch_size // (t.micro_batch_size * self.dp)
        student = models.student
        student.train()
        self.sparsity = MaskKeeper.from_checkpoint(student, student_checkpoint)  # None: dense; applied now
        # MoE student: its router's load-balancing loss, set explicitly (None: dense); docs/moe.md
        self.router_aux = RouterAuxLoss.for_student(student, models.student_arch, cfg.distill.moe_aux_loss_coeff)
        self.projection = attach_projection(cfg, models)  # in DDP's buffers and the optimizer, see PROJECTION
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=self.dp > 1)
        self.ddp = DistributedDataParallel(student.config, ddp_config, student)
        self.offline = offline
        self.lm_only = not offline and lm_only(cfg)
        settings = fp8.settings_from_config(cfg)
        self.fp8 = fp8.Fp8Context(settings) if settings is not None else None
        teacher = None if (offline or self.lm_only) else models.teacher
        self.chunk_tokens = cfg.distill.logit_chunk_tokens  # 0: whole logits; else see distill.chunked
        self.logit_loss = logit_loss_spec(cfg, models.student_arch, offline=offline, lm_only=self.lm_only)
        self.model = DistillModel(self.ddp, teacher, fp8=self.fp8, hidden_out=True)  # losses: distill.chunked
        opt_config = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=0.9,
            adam_beta2=0.95, adam_eps=1e-8, clip_grad=t.clip_grad, bf16=student.config.bf16,
            fp16=student.config.fp16, params_dtype=student.config.params_dtype,
            use_distributed_optimizer=self.dp > 1)
        self.optimizer = get_megatron_optimizer(opt_config, [self.ddp])
        if self.projection is not None:
            delattr(student, PROJECTION)  # trained from here on, but never a model weight
        gbs = t.global_batch_size
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_iters * gbs,
            lr_decay_steps=(t.lr_decay_iters or t.train_iters) * gbs, lr_decay_style="cosine",
            start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.train_iters * gbs,
            wd_incr_style="constant")
        config = self.ddp.config
        config.no_sync_func = self.ddp.no_sync
        config.grad_scale_func = self.optimizer.scale_loss
        config.finalize_model_grads_func = lambda _chunks, *a, **k: finalize_model_grads([self.ddp], *a, **k)
        if self.sparsity is not None:  # pruned weights get zero gradients (docs/sparsity.md: exactness)
            self.sparsity.wrap_finalize(config)
        self.pairs = resolve_pairs(cfg, models.student_arch, models.teacher_arch, self.pp)
        self.step = 0
        self.consumed_samples = 0
        # The whole run's record, kept in every checkpoint so a resumed run reports from step 0:
        # student_eval_loss_start (the held-out loss before step 1), seconds (spent up to the save).
        self.run_state: dict = {}
        self.resumed_from: Optional[int] = None  # the checkpoint step this process resumed at
        self.seconds_before = 0.0  # the run's seconds up to that checkpoint

    # -- checkpoints ------------------------------------------------------------------------------
    def _optimizer_sharded(self, is_loading: bool):
        # fully_reshardable: optimizer state in model space, so a resume may use another TP/PP/DP
        return self.optimizer.sharded_state_dict(
            {**self.models.student.sharded_state_dict(), **self._projection_extra()},
            is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})

    def _projection_extra(self) -> dict:
        """{PROJECTION: {"weight": replicated sharded tensor}} on ranks holding the projection, else {}."""
        if self.projection is None:
            return {}
        from megatron.core.utils import make_sharded_tensor_for_checkpoint

        return {PROJECTION: {"weight": make_sharded_tensor_for_checkpoint(self.projection.weight,
                                                                           f"{PROJECTION}.weight")}}

    @torch.no_grad()
    def _restore_projection(self, loaded_extra: dict) -> None:
        if self.projection is not None:
            self.projection.weight.copy_(loaded_extra[PROJECTION]["weight"])

    def save(self) -> Path:
        extra = {"consumed_samples": self.consumed_samples, "scheduler": self.scheduler.state_dict(),
                 "global_batch_size": self.cfg.train.global_batch_size, "kind": "distill",
                 "projection": needs_projection(self.cfg, self.models.student_arch, self.models.teacher_arch),
                 "run": self.run_state, **({"sparsity": self.sparsity.record} if self.sparsity is not None else {})}
        if self.router_aux is not None:
            extra["moe_aux_loss_coeff"] = self.router_aux.coeff
        return ckpt.save_checkpoint(self.models.student, self.models.student_arch, self.ckpt_root, self.step,
                                    tokenizer_dir=self.tokenizer_dir, extra=extra,
                                    sharded_extra={"optimizer": self._optimizer_sharded(False),
                                                   **self._projection_extra(),
                                                   **(self.sparsity.sharded() if self.sparsity is not None else {})})

    def try_resume(self) -> bool:
        if not (self.cfg.resume and ckpt.is_checkpoint(self.ckpt_root)):
            return False
        meta = ckpt.read_meta(self.ckpt_root)
        extra = meta.get("extra", {})
        if extra.get("kind") != "distill":
            raise MegaslimError(f"{self.ckpt_root} is not a distillation checkpoint; cannot resume from it")
        if extra.get("global_batch_size") != self.cfg.train.global_batch_size:
            raise MegaslimError(
                f"resume: the checkpoint ran with train.global_batch_size={extra.get('global_batch_size')}, "
                f"this config has {self.cfg.train.global_batch_size}")
        sparse = check_resume(meta, self.sparsity, self.ckpt_root)  # a sparse run resumes with its masks only
        check_projection_resume(extra, needs_projection(self.cfg, self.models.student_arch, self.models.teacher_arch),
                                self.ckpt_root)
        if self.router_aux is not None:
            self.router_aux.check_resume(extra, self.ckpt_root)
        prepare_distributed_optimizer_for_load(self.optimizer)
        meta = ckpt.load_into(self.models.student, self.ckpt_root, arch=self.models.student_arch,
                              sharded_extra={"optimizer": self._optimizer_sharded(True), **self._projection_extra(),
                                             **(self.sparsity.load_request() if sparse else {})})
        if sparse:
            self.sparsity.set_masks({k: v.bool() for k, v in meta["loaded_extra"][MASKS_KEY].items()})
        self._restore_projection(meta["loaded_extra"])
        self.optimizer.load_state_dict(meta["loaded_extra"]["optimizer"])
        unshare_adam_steps(self.optimizer)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.step, self.consumed_samples = meta["iteration"], extra["consumed_samples"]
        self.run_state, self.resumed_from = dict(extra.get("run") or {}), self.step
        self.seconds_before = float(self.run_state.get("seconds", 0.0))
        return True

    # -- one step ---------------------------------------------------------------------------------
    def _loss_func(self, batch, output):
        s_out, t_out = output
        mask = batch["loss_mask"]
        d = self.cfg.distill
        kd, lm = chunked.chunked_logit_losses(  # s_out, t_out: final hidden states [s, b, h]
            self.logit_loss, student=self.models.student, s_hidden=s_out, teacher=self.model.teacher,
            t_hidden=t_out, batch=batch, chunk_tokens=self.chunk_tokens)
        lm = None if d.skip_lm_loss else lm
        inter = {}
        for s, t in self.pairs:  # self.projection: None for cosine/mse at equal widths
            s_h, t_h = (losses.full_sequence(cap.states[i], m.config.sequence_parallel)  # whole sequences
                        for cap, i, m in ((self._s_cap, s, self.models.student), (self._t_cap, t, self.models.teacher)))
            inter[pair_metric_key(d.intermediate_loss, s, t)] = losses.intermediate_loss(
                student_hidden=s_h, teacher_hidden=t_h, loss_mask=mask,
                projection=self.projection, kind=d.intermediate_loss, temperature=d.contrastive_temperature)
        parts = losses.combine_losses(kd_loss=kd, lm_loss=lm, intermediate=inter, kd_loss_scale=d.kd_loss_scale,
                                      skip_lm_loss=d.skip_lm_loss)
        # clone: megatron divides the returned loss in place by the number of micro-batches
        return parts["loss"], {k: v.detach().float().clone() for k, v in parts.items()}

    def _forward_step(self, data_iterator, model):
        device = next(self.models.student.parameters()).device
        batch = {k: v.to(device) for k, v in next(data_iterator).items()}
        out = model(batch["tokens"], batch["position_ids"], None)
        return out, partial(self._loss_func, batch)

    def train_step(self, micro_batches: list[dict]) -> dict:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t = self.cfg.train
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        s_layers, t_layers = [p[0] for p in self.pairs], [p[1] for p in self.pairs]
        last = ps.is_pipeline_last_stage()
        self._s_cap = _Capture(self.models.student, s_layers) if last and self.pairs else None
        if self.router_aux is not None:
            self.router_aux.clear()  # the tracker then holds this step's micro-batches only
        self._t_cap = _Capture(self.models.teacher, t_layers) if last and self.pairs else None
        try:
            out = get_forward_backward_func()(
                forward_step_func=self._forward_step, data_iterator=iter(micro_batches), model=[self.model],
                num_microbatches=len(micro_batches), seq_length=self.cfg.data.seq_length,
                micro_batch_size=t.micro_batch_size, forward_only=False,
                **({"adjust_tensor_shapes_fn": self.model.adjust_tensor_shapes}
                   if self.pp > 1 and self.model.teacher is not None else {}))
        finally:
            for cap in (self._s_cap, self._t_cap):
                if cap is not None:
                    cap.remove()
        ok, grad_norm, _ = self.optimizer.step()
        if self.sparsity is not None:  # pruned weights exactly zero after every step
            self.sparsity.mask_params()
        self.scheduler.step(increment=t.global_batch_size)
        self.step += 1
        self.consumed_samples += t.global_batch_size
        aux = self.router_aux.metrics(len(micro_batches)) if self.router_aux is not None else {}
        return {**self._reduce_metrics(out if last else [], grad_norm), **aux}

    def _reduce_metrics(self, outs: list[dict], grad_norm) -> dict:
        """Mean over micro-batches and DP replicas, the same on every rank."""
        from megatron.core import parallel_state as ps

        keys = ["loss", "kd_loss", "lm_loss"] + [pair_metric_key(self.cfg.distill.intermediate_loss, s, t)
                                                 for s, t in self.pairs]
        vec = torch.zeros(len(keys) + 1, dtype=torch.float64)
        if outs and ps.get_tensor_model_parallel_rank() == 0:
            for i, k in enumerate(keys):
                vals = [o[k].double().cpu() for o in outs if k in o]
                vec[i] = sum(vals) / len(vals) / self.dp if vals else 0.0
            vec[-1] = 1.0 / self.dp
        dev = next(self.models.student.parameters()).device
        vec = vec.to(dev)
        dist.all_reduce(vec)
        vec = vec.cpu()
        res = {k: vec[i].item() for i, k in enumerate(keys) if k != "lm_loss" or not self.cfg.distill.skip_lm_loss}
        res["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        res["lr"] = self.optimizer.param_groups[0]["lr"]
        return res

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, model, arch) -> dict:
        model.eval()
        try:
            return evaluate_rows(model, self.eval_rows, vocab_size=arch.vocab_size,
                                 micro_batch_size=self.cfg.data.micro_batch_size)
        finally:
            model.train() if model is self.models.student else None


def step_batches(it: Iterator[dict], n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def write_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """A run resumed at `step` redoes the steps after it: drop their records (and a line a kill cut
    short), so metrics.jsonl holds each step once."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line + "\n")
    mio.atomic_write(path, "".join(keep))


def plot_losses(metrics_path: Path, out_png: Path) -> Optional[Path]:
    plt = pyplot()

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (KD)", alpha=0.8)
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:red",
                 label="held-out LM loss (student)")
        teacher = [r["teacher_eval_loss"] for r in evals if "teacher_eval_loss" in r]
        if teacher:
            ax2.axhline(teacher[0], color="tab:green", ls="--", label="teacher held-out loss")
        ax2.set_ylabel("held-out loss")
        ax2.legend(loc="upper right")
    ax.set(xlabel="step", ylabel="train loss", title="distillation")
    ax.legend(loc="upper left")
    return save_png(fig, out_png)

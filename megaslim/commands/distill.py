"""The distill command: knowledge distillation of a pruned student from its teacher, at any TP/PP/DP.

torchrun --nproc-per-node N launch/distill.py --config CONFIG [key.sub=value ...]
`distill.student.load` unset: the student is the teacher pruned by the `prune` section.
Outputs in <output_dir>: checkpoint/ (torch_dist, resumable with resume=true), metrics.jsonl,
loss_curve.png, distill.json, tensorboard/; export.hf_dir / export.megatron_dir when set and finished.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from megaslim import checkpoint as ckpt
from megaslim import config, megatron_lm
from megaslim import io as mio
from megaslim.commands import cli
from megaslim.config import Config, ModelConfig
from megaslim.data.calibration import calibration_rows
from megaslim.data.corpora import data_path
from megaslim.data.heldout import heldout_rows
from megaslim.data.indexed import cached_indexed, tokenizer_fingerprint
from megaslim.data.loaders import train_micro_batches
from megaslim.distill import fp8
from megaslim.distill import offline as off
from megaslim.distill.train import (
    Models,
    Trainer,
    finite_or_raise,
    lm_only,
    plot_losses,
    resolve_pairs,
    step_batches,
    truncate_metrics,
    write_metrics,
)
from megaslim.errors import MegaslimError
from megaslim.importance.calibrate import compute_importance
from megaslim.importance.scores import ImportanceScores
from megaslim.model.arch import ModelArch, check_parallel_layout
from megaslim.model.hf import check_output_dir, export_hf
from megaslim.prune.depth import depth_kwargs
from megaslim.prune.plan import PrunePlan, build_plan, target_shape
from megaslim.prune.student import student_from_plan
from megaslim.report import Timer, is_rank0, summary_table
from megaslim.runtime import ParallelLayout, Runtime, rank0_print
from megaslim.sources import Source, check_positions, load_model, resolve_source, source_arch
from megaslim.tokenizer import load_tokenizer


# --------------------------------------------------------------------------------------------------
# validate: everything checked and read before any distributed work or compute
# --------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """What validate() read: sources, shapes, tokenizer, rows; filled teacher side first."""
    layout: ParallelLayout
    tokenizer: object
    teacher_arch: ModelArch  # with offline logits: the arch recorded with them
    student_arch: Optional[ModelArch] = None
    teacher_src: Optional[Source] = None  # None: offline teacher logits in `store`
    store: Optional[off.TopKStore] = None
    teacher_identity: Optional[dict] = None  # a teacher the config names beside offline logits
    student_src: Optional[Source] = None  # None: the default student (the teacher pruned now)
    plan: Optional[PrunePlan] = None  # prune.plan_path's plan for the default student
    fp8: Optional[fp8.Fp8Settings] = None
    calib_rows: Optional[torch.Tensor] = None  # importance of the default student, computed now
    eval_path: Optional[Path] = None
    eval_rows: Optional[torch.Tensor] = None
    train_prefix: Optional[str] = None


def validate(cfg: Config) -> Inputs:
    """Every check that needs no compute (layout first), and the sources and rows build() uses."""
    config.validate(cfg)  # load_config ran it; configs built in code (compress stages) need it too
    config.validate_distill(cfg)
    layout = ParallelLayout.from_config(cfg)  # layout errors come first
    layout.check_global_batch(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    inp = _validate_teacher(cfg, layout)
    _validate_student(cfg, inp)
    _check_pair(cfg, inp)
    _check_outputs(cfg)
    _read_data(cfg, inp)
    return inp


def _validate_teacher(cfg: Config, layout: ParallelLayout) -> Inputs:
    """The teacher (a model, or offline logits: then it is never loaded) and the tokenizer."""
    store_dir = off.offline_dir(cfg)
    if store_dir is not None:
        store = off.TopKStore.open(store_dir)
        check_offline_config(cfg, store_dir)
        tokenizer = load_tokenizer(cfg.model, _store_source(store))
        return Inputs(layout, tokenizer, store.teacher_arch, store=store,
                      teacher_identity=_named_teacher(cfg, tokenizer))
    key = "distill.teacher.load" if cfg.distill.teacher.load else "model.load"
    src = resolve_source(cfg.distill.teacher.load or cfg.model.load, key)
    arch = source_arch(src)
    check_parallel_layout(arch, layout.tp, layout.pp)  # an MoE teacher runs at any layout (eval, no aux loss)
    check_positions(arch, cfg.data.seq_length, "the teacher")
    return Inputs(layout, load_tokenizer(cfg.model, src), arch, teacher_src=src)


def check_moe_student(cfg: Config, arch: ModelArch, tp: int, who: str = "the student") -> None:
    """What an MoE student cannot do yet, and distill.moe_aux_loss_coeff without one: refused before any
    weight is read."""
    coeff = cfg.distill.moe_aux_loss_coeff
    if not arch.is_moe:
        if coeff is not None:
            raise MegaslimError(f"distill.moe_aux_loss_coeff={coeff} is set but {who} is not a mixture of "
                                "experts (it has no router); unset it")
        return
    if tp > 1 and not cfg.parallel.sequence_parallel:
        raise MegaslimError(
            f"{who} is a mixture of experts: at parallel.tensor_model_parallel_size={tp} it trains with sequence "
            "parallelism only (megatron-core's MoE layers refuse TP>1 without it): set "
            "parallel.sequence_parallel=true, or use TP=1 with expert, pipeline or data parallelism "
            "(an MoE teacher may use any TP)")


def _validate_student(cfg: Config, inp: Inputs) -> None:
    """distill.student.load (same tokenizer as the teacher's), else the prune section's shape."""
    if cfg.distill.student.load:
        inp.student_src = resolve_source(cfg.distill.student.load, "distill.student.load")
        inp.student_arch = source_arch(inp.student_src)
        check_positions(inp.student_arch, cfg.data.seq_length, "the student")
        if inp.student_src.tokenizer_dir is not None and cfg.model.tokenizer is None:
            st = load_tokenizer(cfg.model, inp.student_src)
            if inp.store is not None:
                inp.store.check(tokenizer=st)
            elif tokenizer_fingerprint(st) != tokenizer_fingerprint(inp.tokenizer):
                raise MegaslimError("teacher and student tokenizers differ; distillation needs the same one")
        return
    if cfg.prune.plan_path:
        inp.plan = PrunePlan.load(cfg.prune.plan_path)
        inp.plan.check_applies_to(inp.teacher_arch)
        inp.student_arch = inp.plan.target_arch
        return
    inp.student_arch = target_shape(inp.teacher_arch, cfg.prune.export_config, tp=inp.layout.tp, hf_export=False)
    if not cfg.importance.scores_path:  # the importance pass's joint-depth checks, now (as prune's validate)
        depth_kwargs(cfg.prune, cfg.importance.layer_metrics, inp.teacher_arch.num_layers, None)


def _check_pair(cfg: Config, inp: Inputs) -> None:
    """Teacher and student fit each other, the layout, the intermediate pairs and FP8."""
    s, t, layout = inp.student_arch, inp.teacher_arch, inp.layout
    if s.vocab_size != t.vocab_size:
        raise MegaslimError(f"teacher vocab {t.vocab_size} != student vocab {s.vocab_size}")
    check_parallel_layout(s, layout.tp, layout.pp)
    check_moe_student(cfg, s, layout.tp)
    resolve_pairs(cfg, s, t, layout.pp)
    teacher_runs = inp.store is None and not lm_only(cfg)
    inp.fp8 = fp8.check_fp8(cfg, archs=[("student", s)] + ([("teacher", t)] if teacher_runs else []), tp=layout.tp)


def _check_outputs(cfg: Config) -> None:
    config.check_output_dir_writable(cfg.output_dir)
    if cfg.export.hf_dir:
        config.check_output_dir_writable(cfg.export.hf_dir, "export.hf_dir")
        check_output_dir(Path(cfg.export.hf_dir))
    if cfg.export.megatron_dir:
        config.check_output_dir_writable(cfg.export.megatron_dir, "export.megatron_dir")
        megatron_lm.check_export_dir(Path(cfg.export.megatron_dir))
    root = Path(cfg.output_dir) / "checkpoint"
    if not ckpt.is_checkpoint(root):
        ckpt.check_output_dir(root)
    elif not cfg.resume:
        raise MegaslimError(f"{root} already holds a checkpoint; set resume=true to continue it or choose "
                            "another output_dir")


def _read_data(cfg: Config, inp: Inputs) -> None:
    """Calibration rows (default student without plan or scores), held-out rows, the training corpus;
    offline logits must cover this run."""
    if inp.student_src is None and inp.plan is None and not cfg.importance.scores_path:
        inp.calib_rows = calibration_rows(cfg.data.calib_path, inp.tokenizer, num_samples=cfg.importance.num_samples,
                                          seq_length=cfg.data.seq_length)
    inp.eval_path = data_path(cfg.data.eval_path, "data.eval_path")  # offline logits record the resolved path
    inp.eval_rows = heldout_rows(inp.eval_path, inp.tokenizer, seq_length=cfg.data.seq_length,
                                 num_samples=cfg.eval.num_samples)
    inp.train_prefix = cached_indexed(data_path(cfg.data.train_path, "data.train_path"), inp.tokenizer)
    if inp.store is not None:
        t = cfg.train
        inp.store.check(tokenizer=inp.tokenizer, seq_length=cfg.data.seq_length, top_k=cfg.distill.top_k,
                        vocab_size=inp.student_arch.vocab_size, num_samples=t.train_iters * t.global_batch_size,
                        seed=t.seed, data=off.data_identity(inp.train_prefix), teacher=inp.teacher_identity)


def check_offline_config(cfg: Config, store_dir) -> None:
    """What offline teacher logits cannot do, refused with the reason."""
    d, problems = cfg.distill, []
    if d.kl != "topk":
        problems.append(f"they hold only the teacher's top-k log-probs: set distill.kl=topk (got {d.kl})")
    if not d.student.load:
        problems.append("the teacher is not loaded, so it cannot be pruned into the default student: set "
                        "distill.student.load (e.g. the checkpoint of launch/prune.py)")
    if d.intermediate_layer_pairs:
        problems.append("intermediate-state losses need the teacher's hidden states: unset "
                        "distill.intermediate_layer_pairs")
    if problems:
        raise MegaslimError(f"distillation from offline teacher logits ({store_dir}): " + "; ".join(problems))


def _store_source(store: off.TopKStore) -> Source:
    return Source("offline", store.path, store.tokenizer_dir, f"offline teacher logits {store.path}")


def _named_teacher(cfg: Config, tokenizer) -> Optional[dict]:
    """Identity of the teacher model.load names beside offline logits in distill.teacher.load, to refuse
    logits of another teacher; None when it names none."""
    named = cfg.model.load
    if not named or off.is_offline_dir(named):
        return None
    src = resolve_source(named)
    return off.teacher_identity(src, source_arch(src), tokenizer)


# --------------------------------------------------------------------------------------------------
# build: runtime, teacher, student, trainer (resumed when asked), training data
# --------------------------------------------------------------------------------------------------
@dataclass
class Built:
    """The run as built: runtime, models, trainer (resumed when asked), this rank's training data."""
    rt: Runtime
    models: Models
    trainer: Trainer
    data: Iterator[dict]
    teacher_label: str
    tokenizer_dir: object
    resumed: bool
    out: Path
    last: dict = field(default_factory=dict)  # the last step's metrics this process ran

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"


def _unloaded(model_cfg: ModelConfig) -> ModelConfig:
    return replace(model_cfg, load=None)  # the source is resolved already


def build(cfg: Config, inp: Inputs) -> Built:
    """Process groups, then teacher and student (the default one pruned now), the trainer and data."""
    rt = cli.start(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # both models alike, so stage activations concatenate under PP and hidden states pair up (train.py)
    sp = inp.layout.sequence_parallel
    if cfg.parallel.sequence_parallel and not sp:
        rank0_print("parallel.sequence_parallel=true at TP=1: sequence parallelism is off (as Megatron-LM)")
    if inp.store is None:
        teacher, teacher_arch, _ = load_model(_unloaded(cfg.model), inp.teacher_src, sequence_parallel=sp)
        teacher_label, tok_dir = inp.teacher_src.label, inp.teacher_src.tokenizer_dir
    else:  # offline teacher logits
        teacher, teacher_arch = None, inp.teacher_arch
        teacher_label, tok_dir = f"offline logits {inp.store.path}", inp.store.tokenizer_dir
    if inp.student_src is not None:
        student, student_arch, _ = load_model(_unloaded(cfg.model), inp.student_src, sequence_parallel=sp)
    else:
        student, student_arch = default_student(cfg, teacher, teacher_arch, inp.plan, inp.calib_rows)
    tok_dir = cfg.model.tokenizer or tok_dir
    models = Models(student, student_arch, teacher, teacher_arch)
    src = inp.student_src
    student_ckpt = src.path if src is not None and src.kind == "checkpoint" else None
    trainer = Trainer(cfg, models, tokenizer_dir=tok_dir, eval_rows=inp.eval_rows, offline=inp.store is not None,
                      student_checkpoint=student_ckpt)  # a sparse student keeps its masks
    resumed = trainer.try_resume()
    if rt.is_rank0:
        cli.save_run_config(cfg)
    built = Built(rt, models, trainer, _train_data(cfg, inp, trainer), teacher_label, tok_dir, resumed, out)
    _resume_outputs(cfg, built)
    return built


def _resume_outputs(cfg: Config, b: Built) -> None:
    """The run's files from where it stands: a resumed run keeps the records up to its checkpoint (a
    killed run may have written later steps, redone now); a fresh run drops an earlier attempt's
    metrics and TensorBoard events. resume=true with nothing to resume says so."""
    if cfg.resume and not b.resumed:
        rank0_print(f"resume=true: nothing to resume in {b.trainer.ckpt_root} (no checkpoint); "
                    "starting from step 0")
    if not b.rt.is_rank0:
        return
    if b.resumed:
        truncate_metrics(b.metrics, b.trainer.step)
        return
    b.metrics.unlink(missing_ok=True)
    for events in (b.out / "tensorboard").glob("events.out.tfevents.*"):
        events.unlink()


def finished_run(cfg: Config) -> Optional[dict]:
    """resume=true on a run that is done (checkpoint at train.train_iters, distill.json of it, export
    made): its distill.json record, and nothing is run or written. Else None."""
    out, root = Path(cfg.output_dir), Path(cfg.output_dir) / "checkpoint"
    if not (cfg.resume and ckpt.is_checkpoint(root)):
        return None
    step = ckpt.latest_iteration(root)
    try:
        record = json.loads((out / "distill.json").read_text())
    except (OSError, ValueError):
        return None  # stopped before its report: the resume reports it
    if step is None or step < cfg.train.train_iters or not isinstance(record, dict) or \
            not record.get("finished") or record.get("steps") != step:
        return None
    if cfg.export.hf_dir and not (Path(cfg.export.hf_dir) / "config.json").is_file():
        return None  # finished, but the export asked for now is not there: the resume writes it
    if cfg.export.megatron_dir and not (Path(cfg.export.megatron_dir) / megatron_lm.TRACKER).is_file():
        return None
    if os.environ.get("RANK", "0") == "0":  # no process group yet: the launcher's rank 0 says it
        print(f"distill: the run in {out} is finished (step {step}, train.train_iters={cfg.train.train_iters}); "
              "nothing to do, nothing changed. Raise train.train_iters to train further, or choose another "
              "output_dir for a new run", flush=True)
    return record


def default_student(cfg: Config, teacher, teacher_arch: ModelArch, plan: Optional[PrunePlan],
                    calib_rows: Optional[torch.Tensor]):
    """(student, arch): the teacher pruned by `plan`, or by the prune section's plan from importance
    (importance.scores_path, or computed now on `calib_rows`)."""
    out = Path(cfg.output_dir)
    if plan is None:
        plan = _plan_from_importance(cfg, teacher, teacher_arch, calib_rows)
    if is_rank0():
        plan.save(out / "prune_plan.json")
    student = student_from_plan(teacher, plan, cfg.model, scratch=out / ".student_full.partial")
    return student, plan.target_arch


def _plan_from_importance(cfg: Config, teacher, teacher_arch: ModelArch, calib_rows) -> PrunePlan:
    if cfg.importance.scores_path:
        scores = ImportanceScores.load(cfg.importance.scores_path, teacher_arch)
    else:
        scores, _ = compute_importance(teacher, teacher_arch, calib_rows, cfg.importance,
                                       micro_batch_size=cfg.data.micro_batch_size,
                                       transformer_impl=cfg.model.transformer_impl,
                                       **depth_kwargs(cfg.prune, cfg.importance.layer_metrics,
                                                      teacher_arch.num_layers, None))
        if is_rank0():
            scores.save(Path(cfg.output_dir) / "importance.safetensors")
    p = cfg.prune
    target = target_shape(teacher_arch, p.export_config, tp=cfg.parallel.tensor_model_parallel_size,
                          hf_export=False)
    return build_plan(teacher_arch, target, scores, drop_layers=p.drop_layers, layer_metric=p.layer_metric,
                      contiguous=p.drop_contiguous, fold_heads=p.fold_heads and p.fold_mode,
                      layer_blocks=p.layer_blocks, expert_metric=p.expert_metric)


def _train_data(cfg: Config, inp: Inputs, trainer: Trainer) -> Iterator[dict]:
    """This DP rank's micro-batches from where the trainer stands (offline: with the teacher's top-k)."""
    t, layout, cache = cfg.train, inp.layout, Path(cfg.output_dir) / "data_cache"
    common = dict(micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                  train_iters=t.train_iters, dp_rank=layout.dp_rank(), dp_size=layout.dp,
                  consumed_samples=trainer.consumed_samples, cache_path=cache)
    if inp.store is None:
        return train_micro_batches(inp.train_prefix, inp.tokenizer, seq_length=cfg.data.seq_length, seed=t.seed,
                                   **common)
    return off.offline_micro_batches(inp.store, inp.train_prefix, inp.tokenizer, top_k=cfg.distill.top_k, **common)


# --------------------------------------------------------------------------------------------------
# train: held-out losses before, the steps, the held-out loss after
# --------------------------------------------------------------------------------------------------
@dataclass
class Losses:
    teacher: Optional[float]  # None: offline logits without a matching recorded evaluation
    start: float
    end: float


def train(cfg: Config, inp: Inputs, b: Built, timer: Timer) -> Losses:
    """Teacher and student held-out losses, then the steps (metrics, TensorBoard, checkpoints). The start
    loss is the whole run's (step 0, kept in the checkpoints), also after a resume."""
    if inp.store is None:
        teacher_eval = b.trainer.evaluate(b.models.teacher, b.models.teacher_arch)
    else:  # the teacher's held-out loss as measured when the logits were computed (same eval set), or None
        teacher_eval = off.teacher_eval_for(inp.store, eval_path=inp.eval_path, num_samples=cfg.eval.num_samples,
                                            seq_length=cfg.data.seq_length)
    teacher_loss = teacher_eval["loss"] if teacher_eval else None
    first = b.trainer.evaluate(b.models.student, b.models.student_arch)["loss"]
    if not b.resumed:
        b.trainer.run_state["student_eval_loss_start"] = first
        if b.rt.is_rank0:
            write_metrics(b.metrics, {"step": b.trainer.step, "eval_loss": first,
                                      **({"teacher_eval_loss": teacher_loss} if teacher_loss is not None else {})})
    start = b.trainer.run_state.get("student_eval_loss_start", first)  # checkpoints before the record: here
    return Losses(teacher_loss, start, _steps(cfg, b, first, timer))


def _steps(cfg: Config, b: Built, last_eval: float, timer: Timer) -> float:
    """Train up to train.train_iters (or an exit_interval stop); the last held-out loss (measured at the
    last step this process runs, so an exit_interval stop reports its own end loss)."""
    trainer, stop_at = b.trainer, cfg.train.train_iters
    board = _board(b)
    bar = tqdm(total=stop_at, initial=trainer.step, desc="distill", disable=not b.rt.is_rank0, dynamic_ncols=True)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
    while trainer.step < stop_at:
        t0 = time.time()
        m = b.last = trainer.train_step(step_batches(b.data, trainer.num_micro))
        dt = time.time() - t0
        finite_or_raise(m["loss"], trainer.step, trainer.ckpt_root)
        record = {"step": trainer.step, **m, "tokens": trainer.consumed_samples * cfg.data.seq_length,
                  "tokens_per_s": tokens_per_step / dt}
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}", **({"aux": f"{m['moe_aux_loss']:.4f}"} if "moe_aux_loss" in m else {}),
                        tok_s=f"{tokens_per_step / dt:.0f}")
        if cfg.eval.interval and trainer.step % cfg.eval.interval == 0 or trainer.step == stop_at or \
                _exits(cfg, trainer.step):
            last_eval = record["eval_loss"] = trainer.evaluate(b.models.student, b.models.student_arch)["loss"]
        if b.rt.is_rank0:
            write_metrics(b.metrics, record)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    board.add_scalar(f"distill/{key}", value, trainer.step)
        if _save_then_stop(cfg, trainer, timer):
            break
    bar.close()
    if board is not None:
        board.close()
    return last_eval


def _board(b: Built):
    """rank 0's TensorBoard writer (a resumed run drops the events after its checkpoint), else None."""
    if not b.rt.is_rank0:
        return None
    from torch.utils.tensorboard import SummaryWriter  # heavy: only where it writes

    return SummaryWriter(str(b.out / "tensorboard"), purge_step=b.trainer.step + 1 if b.resumed else None)


def _exits(cfg: Config, step: int) -> bool:
    """train.exit_interval stops the run after `step` (before train.train_iters)."""
    return bool(cfg.train.exit_interval and step % cfg.train.exit_interval == 0 and step < cfg.train.train_iters)


def _save_then_stop(cfg: Config, trainer: Trainer, timer: Timer) -> bool:
    """Checkpoint at save/exit intervals and at the end (with the run's seconds so far); True when
    exit_interval stops the run early."""
    saving = cfg.checkpoint.save_interval and trainer.step % cfg.checkpoint.save_interval == 0
    exiting = _exits(cfg, trainer.step)
    if saving or exiting or trainer.step == cfg.train.train_iters:
        trainer.run_state["seconds"] = _run_seconds(trainer, timer)
        trainer.save()
    return exiting


def _run_seconds(trainer: Trainer, timer: Timer) -> float:
    """Seconds of the whole run: those up to the checkpoint resumed from, plus this process's."""
    return trainer.seconds_before + timer.seconds


# --------------------------------------------------------------------------------------------------
# report: distill.json, the loss curve, the HF export, the summary table
# --------------------------------------------------------------------------------------------------
def report(cfg: Config, inp: Inputs, b: Built, losses: Losses, timer: Timer) -> dict:
    """The distill.json record (exporting the student to HF when asked and finished), written with the
    loss curve by rank 0; the summary table."""
    trainer, arch = b.trainer, b.models.student_arch
    result = {
        "teacher_eval_loss": losses.teacher, "student_eval_loss_start": losses.start,
        "student_eval_loss": losses.end, "steps": trainer.step,
        "tokens": trainer.consumed_samples * cfg.data.seq_length, "seconds": _run_seconds(trainer, timer),
        "student_params": arch.num_params(), "teacher_params": b.models.teacher_arch.num_params(),
        "checkpoint": str(trainer.ckpt_root), "finished": trainer.step >= cfg.train.train_iters,
        "resumed_from": trainer.resumed_from,  # the checkpoint step this process resumed at (None: fresh)
    }
    if cfg.export.hf_dir and result["finished"]:
        result["hf_dir"] = str(export_hf(b.models.student, arch, cfg.export.hf_dir, tokenizer_dir=b.tokenizer_dir,
                                         source=str(trainer.ckpt_root)))
    if cfg.export.megatron_dir and result["finished"]:
        result["megatron_dir"] = str(megatron_lm.export_megatron_lm(
            b.models.student, arch, cfg.export.megatron_dir, iteration=trainer.step,
            divisible_by=cfg.model.make_vocab_size_divisible_by, tokenizer_dir=b.tokenizer_dir))
    result["mode"] = "offline" if inp.store is not None else ("lm" if trainer.lm_only else "online")
    result["fp8"] = cfg.distill.fp8
    result["sequence_parallel"] = inp.layout.sequence_parallel  # as applied (off at TP=1)
    if trainer.router_aux is not None:  # MoE student: the coefficient applied, and the last step's values
        result["router_aux_loss"] = {"coeff": trainer.router_aux.coeff, "kept": trainer.router_aux.kept,
                                     **{k: v for k, v in b.last.items() if k.startswith("moe_")}}
    gap = losses.start - losses.teacher if losses.teacher is not None else 0.0
    result["gap_recovered"] = (losses.start - losses.end) / gap if gap > 0 else None
    if b.rt.is_rank0:
        mio.write_json(b.out / "distill.json", result)
        plot_losses(b.metrics, b.out / "loss_curve.png")
    _summary(cfg, b, result, timer)
    return result


def _resumed_row(cfg: Config, b: Built) -> list[tuple]:
    """The summary's word on resume=true: where the run resumed, or that there was nothing to resume."""
    if b.resumed:
        return [("resumed", f"from step {b.trainer.resumed_from} (start loss and seconds: the whole run)")]
    if cfg.resume:
        return [("resumed", f"no: nothing to resume in {b.trainer.ckpt_root}, started from step 0")]
    return []


def _summary(cfg: Config, b: Built, result: dict, timer: Timer) -> None:
    teacher_arch, teacher_loss, gap = b.models.teacher_arch, result["teacher_eval_loss"], result["gap_recovered"]
    summary_table("megaslim distill", _resumed_row(cfg, b) + [
        ("teacher", f"{b.teacher_label} ({teacher_arch.num_params():,} params)"),
        ("mode", result["mode"] + (f", fp8={cfg.distill.fp8}" if cfg.distill.fp8 else "")
         + (", sequence parallel" if result["sequence_parallel"] else "")),
        ("student", f"{result['student_params']:,} params"),
        *([("router aux loss", b.trainer.router_aux.describe())] if b.trainer.router_aux is not None else []),
        ("steps / tokens", f"{result['steps']} / {result['tokens']:,}"),
        ("held-out loss: teacher", teacher_loss if teacher_loss is not None else "-"),
        ("held-out loss: student start -> end",
         f"{result['student_eval_loss_start']:.4f} -> {result['student_eval_loss']:.4f}"),
        ("gap recovered", f"{gap:.1%}" if gap is not None else "-"),
        ("seconds", round(result["seconds"], 1)), ("outputs", b.out),
    ])


# --------------------------------------------------------------------------------------------------
def run(cfg: Config) -> dict:
    """One distillation run end to end; the distill.json record."""
    timer = Timer()
    inp = validate(cfg)
    done = finished_run(cfg)
    if done is not None:
        return done
    built = build(cfg, inp)
    return report(cfg, inp, built, train(cfg, inp, built, timer), timer)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(cli.parse_args(__doc__, argv))

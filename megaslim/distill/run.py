"""`launch/distill.py` end to end: checks, teacher + student, training, eval, checkpoints, summary."""
from __future__ import annotations

import os
import time
from pathlib import Path

from megaslim import io as mio
from megaslim import report
from megaslim.commands import cli
from megaslim.config import Config, ModelConfig
from megaslim.errors import MegaslimError


def _model_cfg(cfg: Config, load) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg.model, load=load)


def prepare(cfg: Config) -> dict:
    """Everything checked and read before any distributed work or compute."""
    from megaslim import checkpoint as ckpt
    from megaslim.data.corpora import data_path
    from megaslim.data.indexed import cached_indexed, tokenizer_fingerprint
    from megaslim.data.packing import pack_rows, read_documents
    from megaslim.distill.train import resolve_pairs
    from megaslim.model.arch import check_parallel_layout
    from megaslim.runtime.distributed import check_layout
    from megaslim.sources import resolve_source, source_arch
    from megaslim.tokenizer import load_tokenizer

    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    dp = check_layout(int(os.environ.get("WORLD_SIZE", "1")), tp, pp)
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise MegaslimError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                            f"train.micro_batch_size * DP = {t.micro_batch_size} * {dp}")
    if t.train_iters < 1:
        raise MegaslimError("train.train_iters must be >= 1")
    if t.warmup_iters >= (t.lr_decay_iters or t.train_iters):
        raise MegaslimError(f"train.warmup_iters={t.warmup_iters} must be smaller than train.lr_decay_iters "
                            f"(or train.train_iters when unset) = {t.lr_decay_iters or t.train_iters}")
    from megaslim.distill import offline as off

    store = teacher_src = named_teacher = None
    store_dir = off.offline_dir(cfg)
    if store_dir is not None:  # offline teacher logits: the teacher is never loaded
        store = off.TopKStore.open(store_dir)
        _check_offline_config(cfg, store_dir)
        teacher_arch = store.teacher_arch
        tokenizer = load_tokenizer(cfg.model, _store_source(store))
        named_teacher = _named_teacher(cfg, store_dir, tokenizer)
    else:
        teacher_src = resolve_source(cfg.distill.teacher.load or cfg.model.load)
        teacher_arch = source_arch(teacher_src)
        check_parallel_layout(teacher_arch, tp, pp)
        tokenizer = load_tokenizer(cfg.model, teacher_src)

    student_src = student_arch = plan = None
    if cfg.distill.student.load:
        student_src = resolve_source(cfg.distill.student.load)
        student_arch = source_arch(student_src)
        if student_src.tokenizer_dir is not None and cfg.model.tokenizer is None:
            st = load_tokenizer(cfg.model, student_src)
            if store is not None:
                store.check(tokenizer=st)
            elif tokenizer_fingerprint(st) != tokenizer_fingerprint(tokenizer):
                raise MegaslimError("teacher and student tokenizers differ; distillation needs the same one")
    else:  # the default student: the teacher pruned by the prune section
        from megaslim.prune.plan import PrunePlan, target_shape

        if cfg.prune.sparsity.method:
            raise MegaslimError("prune.sparsity is applied by launch/prune.py; run it and pass "
                                "distill.student.load=<its checkpoint> (the masks travel in the checkpoint)")

        if cfg.prune.plan_path:
            plan = PrunePlan.load(cfg.prune.plan_path)
            plan.check_applies_to(teacher_arch)
            student_arch = plan.target_arch
        else:
            if cfg.prune.iterative != 1:
                raise MegaslimError("the default student of distill.py is pruned in one shot; run launch/prune.py "
                                    "with prune.iterative and pass distill.student.load=<its checkpoint>")
            student_arch = target_shape(teacher_arch, cfg.prune.export_config, tp=tp, hf_export=False)
    if student_arch.vocab_size != teacher_arch.vocab_size:
        raise MegaslimError(f"teacher vocab {teacher_arch.vocab_size} != student vocab {student_arch.vocab_size}")
    check_parallel_layout(student_arch, tp, pp)
    resolve_pairs(cfg, student_arch, teacher_arch, pp)
    from megaslim.distill import fp8
    from megaslim.distill.train import lm_only

    teacher_runs = store is None and not lm_only(cfg)
    fp8_settings = fp8.check_fp8(cfg, archs=[("student", student_arch)]
                                 + ([("teacher", teacher_arch)] if teacher_runs else []), tp=tp)

    if cfg.export.hf_dir:
        from megaslim.model.hf import check_output_dir

        check_output_dir(Path(cfg.export.hf_dir))
    out = Path(cfg.output_dir)
    root = out / "checkpoint"
    if ckpt.is_checkpoint(root) and not cfg.resume:
        raise MegaslimError(f"{root} already holds a checkpoint; set resume=true to continue it or choose "
                            "another output_dir")
    ckpt.check_output_dir(root) if not ckpt.is_checkpoint(root) else None

    calib_rows = None
    if student_src is None and plan is None and not cfg.importance.scores_path:
        from megaslim.data.calibration import calibration_rows

        calib_rows = calibration_rows(cfg.data.calib_path, tokenizer, num_samples=cfg.importance.num_samples,
                                      seq_length=cfg.data.seq_length)
    eval_path = data_path(cfg.data.eval_path, "data.eval_path")
    eval_rows = pack_rows(read_documents(eval_path), tokenizer, seq_length=cfg.data.seq_length,
                          num_rows=cfg.eval.num_samples, what=f"data.eval_path={eval_path}")
    train_prefix = cached_indexed(data_path(cfg.data.train_path, "data.train_path"), tokenizer)
    if store is not None:
        store.check(tokenizer=tokenizer, seq_length=cfg.data.seq_length, top_k=cfg.distill.top_k,
                    vocab_size=student_arch.vocab_size, num_samples=t.train_iters * t.global_batch_size,
                    seed=t.seed, data=off.data_identity(train_prefix), teacher=named_teacher)
    return dict(teacher_src=teacher_src, teacher_arch=teacher_arch, student_src=student_src,
                student_arch=student_arch, plan=plan, tokenizer=tokenizer, calib_rows=calib_rows,
                eval_rows=eval_rows, train_prefix=train_prefix, dp=dp, store=store, eval_path=eval_path,
                fp8=fp8_settings)


def _check_offline_config(cfg: Config, store_dir) -> None:
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


def _store_source(store):
    from megaslim.sources import Source

    return Source("offline", store.path, store.tokenizer_dir, f"offline teacher logits {store.path}")


def _named_teacher(cfg: Config, store_dir, tokenizer):
    """Identity of a teacher model the config also names (model.load, or distill.teacher.load beside
    distill.offline_logits), to refuse logits of another teacher; None when none is named."""
    from megaslim.distill import offline as off
    from megaslim.sources import resolve_source, source_arch

    named = cfg.distill.teacher.load if getattr(cfg.distill, "offline_logits", None) else None
    named = named if named and not off.is_offline_dir(named) else cfg.model.load
    if not named or off.is_offline_dir(named):
        return None
    src = resolve_source(named)
    return off.teacher_identity(src, source_arch(src), tokenizer)


def default_student(cfg: Config, teacher, teacher_arch, plan, calib_rows):
    """Apply the prune section to the teacher (importance from scores_path or computed now)."""
    from megaslim.importance.scores import ImportanceScores
    from megaslim.prune.apply import build_pruned, write_pruned_stage
    from megaslim.prune.plan import build_plan, target_shape

    out = Path(cfg.output_dir)
    if plan is None:
        if cfg.importance.scores_path:
            scores = ImportanceScores.load(cfg.importance.scores_path, teacher_arch)
        else:
            from megaslim.importance.calibrate import compute_importance

            scores, _ = compute_importance(teacher, teacher_arch, calib_rows, cfg.importance,
                                           micro_batch_size=cfg.data.micro_batch_size,
                                           transformer_impl=cfg.model.transformer_impl)
            if report.is_rank0():
                scores.save(out / "importance.safetensors")
        target = target_shape(teacher_arch, cfg.prune.export_config,
                              tp=cfg.parallel.tensor_model_parallel_size, hf_export=False)
        plan = build_plan(teacher_arch, target, scores, drop_layers=cfg.prune.drop_layers,
                          layer_metric=cfg.prune.layer_metric, contiguous=cfg.prune.drop_contiguous,
                          fold_heads=cfg.prune.fold_heads and cfg.prune.fold_mode)
    if report.is_rank0():
        plan.save(out / "prune_plan.json")
    scratch = out / ".student_full.partial"
    write_pruned_stage(teacher, plan, scratch)
    student = build_pruned(plan, scratch, cfg.model)
    import torch.distributed as dist

    dist.barrier()
    if report.is_rank0():
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return student, plan.target_arch


def run(cfg: Config) -> dict:
    timer = report.Timer()
    p = prepare(cfg)
    rt = cli.start(cfg)
    from megatron.core import parallel_state as ps

    from megaslim.data.loaders import train_micro_batches
    from megaslim.distill.train import Models, Trainer, _finite_or_raise, plot_losses, step_batches, write_metrics
    from megaslim.sources import load_model

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = p["store"]
    if store is None:
        teacher, teacher_arch, _ = load_model(_model_cfg(cfg, None), p["teacher_src"])
        teacher_label = p["teacher_src"].label
    else:  # offline teacher logits
        teacher, teacher_arch, teacher_label = None, p["teacher_arch"], f"offline logits {store.path}"
    if p["student_src"] is not None:
        student, student_arch, _ = load_model(_model_cfg(cfg, None), p["student_src"])
    else:
        student, student_arch = default_student(cfg, teacher, teacher_arch, p["plan"], p["calib_rows"])
    tok_dir = cfg.model.tokenizer or (p["teacher_src"].tokenizer_dir if store is None else store.tokenizer_dir)
    models = Models(student, student_arch, teacher, teacher_arch)
    student_ckpt = p["student_src"].path if p["student_src"] is not None and p["student_src"].kind == "checkpoint" \
        else None
    trainer = Trainer(cfg, models, tokenizer_dir=tok_dir, eval_rows=p["eval_rows"], offline=store is not None,
                      student_checkpoint=student_ckpt)  # a sparse student keeps its masks
    resumed = trainer.try_resume()
    if rt.is_rank0:
        cli.save_run_config(cfg)
    t = cfg.train
    metrics = out / "metrics.jsonl"
    if rt.is_rank0 and not resumed and metrics.exists():
        metrics.unlink()
    if store is None:
        data = train_micro_batches(p["train_prefix"], p["tokenizer"], seq_length=cfg.data.seq_length,
                                   micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                                   train_iters=t.train_iters, dp_rank=ps.get_data_parallel_rank(),
                                   dp_size=p["dp"], seed=t.seed, consumed_samples=trainer.consumed_samples,
                                   cache_path=out / "data_cache")
        teacher_eval = trainer.evaluate(teacher, teacher_arch)
    else:
        from megaslim.distill.offline import offline_micro_batches, teacher_eval_for

        data = offline_micro_batches(store, p["train_prefix"], p["tokenizer"], micro_batch_size=t.micro_batch_size,
                                     global_batch_size=t.global_batch_size, train_iters=t.train_iters,
                                     dp_rank=ps.get_data_parallel_rank(), dp_size=p["dp"],
                                     consumed_samples=trainer.consumed_samples, top_k=cfg.distill.top_k,
                                     cache_path=out / "data_cache")
        # the teacher's held-out loss as measured when the logits were computed (same eval set), or None
        teacher_eval = teacher_eval_for(store, eval_path=p["eval_path"], num_samples=cfg.eval.num_samples,
                                        seq_length=cfg.data.seq_length)
    teacher_loss = teacher_eval["loss"] if teacher_eval else None
    first_eval = trainer.evaluate(student, student_arch)
    if rt.is_rank0 and not resumed:
        write_metrics(metrics, {"step": trainer.step, "eval_loss": first_eval["loss"],
                                **({"teacher_eval_loss": teacher_loss} if teacher_loss is not None else {})})
    from tqdm import tqdm

    board = None
    if rt.is_rank0:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(out / "tensorboard"), purge_step=trainer.step + 1 if resumed else None)
    bar = tqdm(total=t.train_iters, initial=trainer.step, desc="distill", disable=not rt.is_rank0,
               dynamic_ncols=True)
    tokens_per_step = t.global_batch_size * cfg.data.seq_length
    last_eval = first_eval
    stop_at = t.train_iters
    while trainer.step < stop_at:
        t0 = time.time()
        m = trainer.train_step(step_batches(data, trainer.num_micro))
        dt = time.time() - t0
        _finite_or_raise(m["loss"], trainer.step, trainer.ckpt_root)
        record = {"step": trainer.step, **m, "tokens": trainer.consumed_samples * cfg.data.seq_length,
                  "tokens_per_s": tokens_per_step / dt}
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tokens_per_step / dt:.0f}")
        if cfg.eval.interval and trainer.step % cfg.eval.interval == 0 or trainer.step == stop_at:
            last_eval = trainer.evaluate(student, student_arch)
            record["eval_loss"] = last_eval["loss"]
        if rt.is_rank0:
            write_metrics(metrics, record)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    board.add_scalar(f"distill/{key}", value, trainer.step)
        saving = cfg.checkpoint.save_interval and trainer.step % cfg.checkpoint.save_interval == 0
        exiting = t.exit_interval and trainer.step % t.exit_interval == 0
        if saving or exiting or trainer.step == stop_at:
            trainer.save()
        if exiting and trainer.step < stop_at:
            break
    bar.close()
    if board is not None:
        board.close()
    result = {
        "teacher_eval_loss": teacher_loss, "student_eval_loss_start": first_eval["loss"],
        "student_eval_loss": last_eval["loss"], "steps": trainer.step,
        "tokens": trainer.consumed_samples * cfg.data.seq_length, "seconds": timer.seconds,
        "student_params": student_arch.num_params(), "teacher_params": teacher_arch.num_params(),
        "checkpoint": str(trainer.ckpt_root), "finished": trainer.step >= stop_at,
    }
    if cfg.export.hf_dir and result["finished"]:
        from megaslim.model.hf import export_hf

        result["hf_dir"] = str(export_hf(student, student_arch, cfg.export.hf_dir, tokenizer_dir=tok_dir,
                                         source=str(trainer.ckpt_root)))
    result["mode"] = "offline" if store is not None else ("lm" if trainer.lm_only else "online")
    result["fp8"] = cfg.distill.fp8
    gap = first_eval["loss"] - teacher_loss if teacher_loss is not None else 0.0
    result["gap_recovered"] = (first_eval["loss"] - last_eval["loss"]) / gap if gap > 0 else None
    if rt.is_rank0:
        mio.write_json(out / "distill.json", result)
        plot_losses(metrics, out / "loss_curve.png")
    report.summary_table("megaslim distill", [
        ("teacher", f"{teacher_label} ({teacher_arch.num_params():,} params)"),
        ("mode", result["mode"] + (f", fp8={cfg.distill.fp8}" if cfg.distill.fp8 else "")),
        ("student", f"{student_arch.num_params():,} params"),
        ("steps / tokens", f"{trainer.step} / {result['tokens']:,}"),
        ("held-out loss: teacher", teacher_loss if teacher_loss is not None else "-"),
        ("held-out loss: student start -> end", f"{first_eval['loss']:.4f} -> {last_eval['loss']:.4f}"),
        ("gap recovered", f"{result['gap_recovered']:.1%}" if result["gap_recovered"] is not None else "-"),
        ("seconds", round(timer.seconds, 1)), ("outputs", out),
    ])
    return result

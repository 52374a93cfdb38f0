"""The compression pipeline (launch/compress.py): rounds of importance -> prune -> distill -> export.

Each round prunes the previous round's distilled student (the first round: `model.load`) to its
target and distills it from the original teacher (or the previous round's model, `compress.teacher`).
Every stage writes its results under <output_dir>/round<N>/; a rerun skips finished stages and resumes
an interrupted distillation. Optional: teacher correction first (`compress.teacher_correction_iters`),
a parameter budget instead of a shape (`prune.target_params`, one round), and lm-evaluation-harness
tasks on every HF export (`compress.lm_eval_tasks`).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from megaslim import io as mio
from megaslim import report
from megaslim.commands import cli
from megaslim.config import Config
from megaslim.errors import MegaslimError


def _stage_cfg(cfg: Config, **changes) -> Config:
    new = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        obj = new
        *path, last = dotted.split("__")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, last, value)
    return new


def _done(path: Path, key: str | None = None) -> dict | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if key is None or data.get(key) else None


def _layout(cfg: Config) -> None:
    """Stages may leave megatron at another layout (prune's target TP/PP): restore the configured one."""
    import torch.distributed as dist

    if dist.is_initialized():
        from megaslim.prune.apply import reinit_parallel

        reinit_parallel(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                        cfg.train.seed)


def check(cfg: Config) -> list:
    """Round targets, validated against each other before anything runs."""
    from megaslim.prune.plan import target_shape
    from megaslim.sources import resolve_source, source_arch

    rounds = list(cfg.compress.rounds) or [cfg.prune.export_config]
    arch = source_arch(resolve_source(cfg.model.load))
    tp = cfg.parallel.tensor_model_parallel_size
    if cfg.prune.target_params is not None:
        from megaslim.prune.run import search_candidates

        if cfg.compress.rounds:
            raise MegaslimError("prune.target_params searches one round's shape; unset compress.rounds (or give "
                                "every round its shape and unset prune.target_params)")
        search_candidates(cfg, arch)
    for i, target in enumerate(rounds):
        try:
            arch = target_shape(arch, target, tp=tp, hf_export=True)
        except MegaslimError as err:
            raise MegaslimError(f"compress round {i + 1}: {err}") from None
    if cfg.prune.drop_layers or cfg.prune.plan_path:
        raise MegaslimError("compress takes its targets from compress.rounds / prune.export_config; "
                            "unset prune.drop_layers and prune.plan_path")
    return rounds


def _teacher_correction(cfg: Config, out: Path) -> dict | None:
    """compress.teacher_correction_iters > 0: fine-tune the teacher on the train corpus with the LM loss
    (Minitron's teacher correction); the corrected teacher is then pruned and distilled from."""
    from megaslim.distill.run import run as run_distill
    from megaslim.sources import resolve_source

    iters = cfg.compress.teacher_correction_iters
    if iters == 0:
        return None
    tdir = out / "teacher_correction"
    done = _done(tdir / "distill.json", "finished")
    if done is None:
        _layout(cfg)
        resume = (tdir / "checkpoint" / "latest").is_file()
        done = run_distill(_stage_cfg(
            cfg, output_dir=str(tdir), distill__student__load=str(resolve_source(cfg.model.load).path),
            distill__kd_loss_scale=0.0, distill__skip_lm_loss=False, distill__intermediate_layer_pairs=[],
            train__train_iters=iters, train__warmup_iters=min(cfg.train.warmup_iters, iters // 10),
            train__lr_decay_iters=None, export__hf_dir=None, resume=resume))
    return done


def _lm_eval(cfg: Config, hf_dir: Path, out_json: Path) -> dict | None:
    """compress.lm_eval_tasks on one HF export (rank 0), or a message where lm-eval is not installed."""
    tasks = list(cfg.compress.lm_eval_tasks)
    if not tasks:
        return None
    done = _done(out_json)
    if done is not None:
        return done
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        from megaslim.runtime import rank0_print

        rank0_print(f"compress.lm_eval_tasks={tasks}: lm-evaluation-harness is not installed, skipping "
                    "(pip install 'megaslim[eval]'; docs/lm_eval.md)")
        return None
    result = None
    if report.is_rank0():
        from lm_eval import simple_evaluate

        res = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=tasks,
                              batch_size=8)
        result = {task: {k: v for k, v in m.items() if isinstance(v, (int, float))}
                  for task, m in res["results"].items()}
        mio.write_json(out_json, result)
    return result


def run(cfg: Config) -> dict:
    from megaslim.distill.run import run as run_distill
    from megaslim.prune.run import run as run_prune

    timer = report.Timer()
    rounds = check(cfg)
    cli.start(cfg)  # even when every stage is already done: rank 0 alone writes the summary
    out = Path(cfg.output_dir)
    corrected = _teacher_correction(cfg, out)
    if corrected is not None and not corrected["finished"]:
        return _stopped("teacher correction", corrected)
    original = cfg.model.load if corrected is None else corrected["checkpoint"]
    source, family = original, []
    for i, target in enumerate(rounds, 1):
        rdir = out / f"round{i}"
        pdir, ddir, hf_dir = rdir / "prune", rdir / "distill", rdir / "hf"
        pruned = _done(pdir / "prune.json")
        if pruned is None:
            _layout(cfg)
            pruned = run_prune(_stage_cfg(cfg, output_dir=str(pdir), model__load=source,
                                          prune__export_config=target, export__hf_dir=None,
                                          importance__only=False))
        teacher = original if cfg.compress.teacher == "original" else source
        distilled = _done(ddir / "distill.json", "finished")
        if distilled is None:
            _layout(cfg)
            resume = (ddir / "checkpoint" / "latest").is_file()
            distilled = run_distill(_stage_cfg(cfg, output_dir=str(ddir), distill__teacher__load=teacher,
                                               distill__student__load=str(pdir / "checkpoint"),
                                               export__hf_dir=str(hf_dir), resume=resume))
        if not distilled["finished"]:
            return _stopped(f"round {i} distillation", distilled)
        family.append({"round": i, "params": pruned["params_after"], "pruned_loss": pruned["loss_after"],
                       "distilled_loss": distilled["student_eval_loss"],
                       "teacher_loss": distilled["teacher_eval_loss"], "tokens": distilled["tokens"],
                       "prune_seconds": pruned["seconds"], "distill_seconds": distilled["seconds"],
                       "checkpoint": distilled["checkpoint"], "hf_dir": str(hf_dir)})
        source = str(ddir / "checkpoint")
    # lm-eval last, on rank 0 alone, after every collective: the other ranks must not wait on it
    for r in family:
        r["lm_eval"] = _lm_eval(cfg, Path(r["hf_dir"]), out / f"round{r['round']}" / "lm_eval.json")
    result = {"source_params": _done(out / "round1" / "prune" / "prune.json")["params_before"],
              "teacher_correction": corrected and {k: corrected[k] for k in (
                  "student_eval_loss_start", "student_eval_loss", "tokens", "seconds", "checkpoint")},
              "rounds": family, "seconds": timer.seconds}
    if report.is_rank0():
        mio.write_json(out / "compress.json", result)
        _plot_family(result, out / "family.png")
    _table(result)
    return result


def _stopped(stage: str, done: dict) -> dict:
    """A stage that ended early (train.exit_interval): later stages must not build on it."""
    from megaslim.runtime import rank0_print

    rank0_print(f"compress: the {stage} stopped at step {done['steps']} of its run (train.exit_interval); "
                "run the same command again to continue it")
    return {"stopped": stage, "steps": done["steps"]}


def _table(result: dict) -> None:
    if not report.is_rank0():
        return
    import math

    from rich.console import Console
    from rich.table import Table

    t = Table(title="megaslim compress: the model family")
    for col in ("model", "params", "held-out loss", "ppl", "tokens", "seconds"):
        t.add_column(col, no_wrap=True)
    first = result["rounds"][0]
    tc = result.get("teacher_correction")
    if tc:
        t.add_row("teacher", f"{result['source_params'] / 1e6:.2f}M", f"{tc['student_eval_loss_start']:.4f}",
                  f"{math.exp(tc['student_eval_loss_start']):.2f}", "-", "-")
    t.add_row("teacher (corrected)" if tc else "teacher", f"{result['source_params'] / 1e6:.2f}M",
              f"{first['teacher_loss']:.4f}", f"{math.exp(first['teacher_loss']):.2f}",
              f"{tc['tokens']:,}" if tc else "-", f"{tc['seconds']:.0f}" if tc else "-")
    for r in result["rounds"]:
        t.add_row(f"round {r['round']} pruned", f"{r['params'] / 1e6:.2f}M", f"{r['pruned_loss']:.4f}",
                  f"{math.exp(r['pruned_loss']):.2f}", "-", f"{r['prune_seconds']:.0f}")
        t.add_row(f"round {r['round']} distilled", f"{r['params'] / 1e6:.2f}M", f"{r['distilled_loss']:.4f}",
                  f"{math.exp(r['distilled_loss']):.2f}", f"{r['tokens']:,}", f"{r['distill_seconds']:.0f}")
    console = Console()
    console.print(t)
    for r in result["rounds"]:
        console.print(f"round {r['round']}: HF export {r['hf_dir']}, checkpoint {r['checkpoint']}", soft_wrap=True)
        for task, metrics in (r.get("lm_eval") or {}).items():
            console.print(f"round {r['round']} lm-eval {task}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in metrics.items()), soft_wrap=True)


def _plot_family(result: dict, path: Path) -> None:
    from megaslim.figures import pyplot, save_png

    fig, ax = pyplot().subplots(figsize=(6, 4))
    rs = result["rounds"]
    ax.scatter([result["source_params"] / 1e6], [rs[0]["teacher_loss"]], marker="*", s=150, label="teacher")
    ax.plot([r["params"] / 1e6 for r in rs], [r["pruned_loss"] for r in rs], "x--", label="pruned")
    ax.plot([r["params"] / 1e6 for r in rs], [r["distilled_loss"] for r in rs], "o-", label="pruned + distilled")
    ax.set(xlabel="parameters (M)", ylabel="held-out loss", title="compressed family")
    ax.legend()
    save_png(fig, path)

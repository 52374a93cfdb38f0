"""The compress command (launch/compress.py): rounds of importance -> prune -> distill -> export.

torchrun --nproc-per-node N launch/compress.py --config CONFIG [key.sub=value ...]
Each round prunes the previous round's distilled student (the first round: `model.load`) to its
target and distills it from the original teacher (or the previous round's model, `compress.teacher`).
Every stage writes its results under <output_dir>/round<N>/; a rerun skips finished stages and resumes
an interrupted distillation. Optional: teacher correction first (`compress.teacher_correction_iters`),
a parameter budget instead of a shape (`prune.target_params` or `target_active_params`, one round), and
lm-evaluation-harness tasks on every HF export (`compress.lm_eval_tasks`). `--dry-run` plans the run instead
(megaslim.commands.plan).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from megaslim import io as mio
from megaslim import report
from megaslim.commands import cli
from megaslim.commands import distill as distill_cmd
from megaslim.commands import plan as plan_cmd
from megaslim.commands import prune as prune_cmd
from megaslim.config import Config, check_output_dir_writable, validate, validate_compress
from megaslim.config.validate import search_budget_key
from megaslim.errors import MegaslimError
from megaslim.figures import pyplot, save_png
from megaslim.prune.apply import reinit_parallel
from megaslim.prune.plan import target_shape
from megaslim.runtime import ParallelLayout, rank0_print
from megaslim.runtime.layout import check_layout
from megaslim.sources import resolve_source, source_arch


class _Stopped(Exception):
    """A stage that ended early (train.exit_interval): later stages must not build on it."""

    def __init__(self, stage: str, done: dict):
        super().__init__(stage)
        self.stage, self.done = stage, done


def _stage_cfg(cfg: Config, **changes) -> Config:
    """A stage's config: `cfg` with `section__key=value` changes, validated as a loaded config is."""
    new = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        obj = new
        *path, last = dotted.split("__")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, last, value)
    validate(new)
    return new


def _done(path: Path, key: Optional[str] = None) -> Optional[dict]:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if key is None or data.get(key) else None


def _layout(cfg: Config, layout: ParallelLayout) -> None:
    """Stages may leave megatron at another layout (prune's target TP/PP): restore the configured one."""
    if dist.is_initialized():
        reinit_parallel(layout.tp, layout.pp, cfg.train.seed)


# -- validate ------------------------------------------------------------------------------------


def check(cfg: Config) -> tuple[ParallelLayout, list]:
    """(layout, round targets), validated against each other before anything runs; the layout first."""
    validate(cfg)  # load_config ran it; configs built in code need it too
    check_output_dir_writable(cfg.output_dir)
    layout = ParallelLayout.from_config(cfg)
    check_layout(layout.world_size, layout.target_tp or layout.tp, layout.target_pp or layout.pp)  # prune output
    layout.check_global_batch(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    validate_compress(cfg)
    rounds = list(cfg.compress.rounds) or [cfg.prune.export_config]
    arch = source_arch(resolve_source(cfg.model.load))
    distill_cmd.check_moe_student(cfg, arch, layout.tp, "model.load")  # every round distills it (or its pruning)
    if search_budget_key(cfg.prune) is not None:  # target_params or target_active_params
        prune_cmd.search_candidates(cfg, arch)
    for i, target in enumerate(rounds):
        try:
            arch = target_shape(arch, target, tp=layout.tp, hf_export=True)
        except MegaslimError as err:
            raise MegaslimError(f"compress round {i + 1}: {err}") from None
    return layout, rounds


# -- run: the stages -----------------------------------------------------------------------------


def _distill(cfg: Config, layout: ParallelLayout, out: Path, **changes) -> dict:
    """A distillation stage in `out` (finished: its record; else run, resuming a checkpoint there)."""
    done = _done(out / "distill.json", "finished")
    if done is None:
        _layout(cfg, layout)
        resume = (out / "checkpoint" / "latest").is_file()
        done = distill_cmd.run(_stage_cfg(cfg, output_dir=str(out), resume=resume, **changes))
    return done


def _teacher_correction(cfg: Config, layout: ParallelLayout, out: Path) -> Optional[dict]:
    """compress.teacher_correction_iters > 0: fine-tune the teacher on the train corpus with the LM loss
    (Minitron's teacher correction); the corrected teacher is then pruned and distilled from."""
    iters = cfg.compress.teacher_correction_iters
    if iters == 0:
        return None
    done = _distill(cfg, layout, out / "teacher_correction",
                    distill__student__load=str(resolve_source(cfg.model.load).path), distill__kd_loss_scale=0.0,
                    distill__skip_lm_loss=False, distill__intermediate_layer_pairs=[], train__train_iters=iters,
                    train__warmup_iters=min(cfg.train.warmup_iters, iters // 10), train__lr_decay_iters=None,
                    export__hf_dir=None, export__megatron_dir=None)
    if not done["finished"]:
        raise _Stopped("teacher correction", done)
    return done


def _drop_unfinished(pdir: Path) -> None:
    """A prune stage killed after its checkpoint but before prune.json is redone: its checkpoint goes
    (prune refuses to write over a checkpoint it did not finish describing)."""
    ckpt_dir = pdir / "checkpoint"
    if ckpt_dir.exists() and ParallelLayout.is_writer():
        shutil.rmtree(ckpt_dir)
    if dist.is_initialized():
        dist.barrier()


def _round(cfg: Config, layout: ParallelLayout, i: int, target, source: str, original: str, out: Path) -> dict:
    """Round i: prune `source` to `target`, distill it; the family member's record."""
    rdir = out / f"round{i}"
    pdir, hf_dir = rdir / "prune", rdir / "hf"
    pruned = _done(pdir / "prune.json")
    if pruned is None:
        _layout(cfg, layout)
        _drop_unfinished(pdir)
        pruned = prune_cmd.run(_stage_cfg(cfg, output_dir=str(pdir), model__load=source,
                                          prune__export_config=target, export__hf_dir=None,
                                          export__megatron_dir=None, importance__only=False))
    teacher = original if cfg.compress.teacher == "original" else source
    megatron_dir = str(Path(cfg.export.megatron_dir) / f"round{i}") if cfg.export.megatron_dir else None
    distilled = _distill(cfg, layout, rdir / "distill", distill__teacher__load=teacher,
                         distill__student__load=str(pdir / "checkpoint"), export__hf_dir=str(hf_dir),
                         export__megatron_dir=megatron_dir)
    if not distilled["finished"]:
        raise _Stopped(f"round {i} distillation", distilled)
    return {"round": i, "params": pruned["params_after"], "pruned_loss": pruned["loss_after"],
            "distilled_loss": distilled["student_eval_loss"], "teacher_loss": distilled["teacher_eval_loss"],
            "tokens": distilled["tokens"], "prune_seconds": pruned["seconds"],
            "distill_seconds": distilled["seconds"], "checkpoint": distilled["checkpoint"], "hf_dir": str(hf_dir)}


def _lm_eval(cfg: Config, hf_dir: Path, out_json: Path) -> Optional[dict]:
    """compress.lm_eval_tasks on one HF export (rank 0), or a message where lm-eval is not installed."""
    tasks = list(cfg.compress.lm_eval_tasks)
    if not tasks:
        return None
    done = _done(out_json)
    if done is not None:
        return done
    if importlib.util.find_spec("lm_eval") is None:
        rank0_print(f"compress.lm_eval_tasks={tasks}: lm-evaluation-harness is not installed, skipping "
                    "(pip install 'megaslim[eval]'; docs/lm_eval.md)")
        return None
    result = None
    if report.is_rank0():
        from lm_eval import simple_evaluate  # optional and heavy: only when tasks are asked for

        res = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=tasks,
                              batch_size=8)
        result = {task: {k: v for k, v in m.items() if isinstance(v, (int, float))}
                  for task, m in res["results"].items()}
        mio.write_json(out_json, result)
    return result


def _family(cfg: Config, layout: ParallelLayout, rounds: list, out: Path, corrected: Optional[dict]) -> list:
    original = cfg.model.load if corrected is None else corrected["checkpoint"]
    source, family = original, []
    for i, target in enumerate(rounds, 1):
        family.append(_round(cfg, layout, i, target, source, original, out))
        source = str(out / f"round{i}" / "distill" / "checkpoint")
    # lm-eval last, on rank 0 alone, after every collective: the other ranks must not wait on it
    for r in family:
        r["lm_eval"] = _lm_eval(cfg, Path(r["hf_dir"]), out / f"round{r['round']}" / "lm_eval.json")
    return family


def run(cfg: Config) -> dict:
    """The whole compress command for `cfg`; returns the compress.json record (or where it stopped)."""
    timer = report.Timer()
    layout, rounds = check(cfg)
    cli.start(cfg)  # even when every stage is already done: rank 0 alone writes the summary
    out = Path(cfg.output_dir)
    try:
        corrected = _teacher_correction(cfg, layout, out)
        family = _family(cfg, layout, rounds, out, corrected)
    except _Stopped as stop:
        return _stopped(stop.stage, stop.done)
    result = {"source_params": _done(out / "round1" / "prune" / "prune.json")["params_before"],
              "teacher_correction": corrected and {k: corrected[k] for k in (
                  "student_eval_loss_start", "student_eval_loss", "tokens", "seconds", "checkpoint")},
              "rounds": family, "seconds": timer.seconds}
    if report.is_rank0():
        mio.write_json(out / "compress.json", result)
        _plot_family(result, out / "family.png")
    _table(result)
    return result


# -- report --------------------------------------------------------------------------------------


def _stopped(stage: str, done: dict) -> dict:
    rank0_print(f"compress: the {stage} stopped at step {done['steps']} of its run (train.exit_interval); "
                "run the same command again to continue it")
    return {"stopped": stage, "steps": done["steps"]}


def _family_rows(result: dict) -> list[tuple[str, ...]]:
    """(model, params, held-out loss, ppl, tokens, seconds) per teacher and family member."""
    first, tc = result["rounds"][0], result.get("teacher_correction")
    params = f"{result['source_params'] / 1e6:.2f}M"
    rows = []
    if tc:
        loss = tc["student_eval_loss_start"]
        rows.append(("teacher", params, f"{loss:.4f}", f"{math.exp(loss):.2f}", "-", "-"))
    rows.append(("teacher (corrected)" if tc else "teacher", params, f"{first['teacher_loss']:.4f}",
                 f"{math.exp(first['teacher_loss']):.2f}", f"{tc['tokens']:,}" if tc else "-",
                 f"{tc['seconds']:.0f}" if tc else "-"))
    for r in result["rounds"]:
        size = f"{r['params'] / 1e6:.2f}M"
        rows.append((f"round {r['round']} pruned", size, f"{r['pruned_loss']:.4f}",
                     f"{math.exp(r['pruned_loss']):.2f}", "-", f"{r['prune_seconds']:.0f}"))
        rows.append((f"round {r['round']} distilled", size, f"{r['distilled_loss']:.4f}",
                     f"{math.exp(r['distilled_loss']):.2f}", f"{r['tokens']:,}", f"{r['distill_seconds']:.0f}"))
    return rows


def _table(result: dict) -> None:
    if not report.is_rank0():
        return
    t = Table(title="megaslim compress: the model family")
    for col in ("model", "params", "held-out loss", "ppl", "tokens", "seconds"):
        t.add_column(col, no_wrap=True)
    for row in _family_rows(result):
        t.add_row(*row)
    console = Console()
    console.print(t)
    for r in result["rounds"]:
        console.print(f"round {r['round']}: HF export {r['hf_dir']}, checkpoint {r['checkpoint']}", soft_wrap=True)
        for task, metrics in (r.get("lm_eval") or {}).items():
            console.print(f"round {r['round']} lm-eval {task}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in metrics.items()), soft_wrap=True)


def _plot_family(result: dict, path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 4))
    rs = result["rounds"]
    ax.scatter([result["source_params"] / 1e6], [rs[0]["teacher_loss"]], marker="*", s=150, label="teacher")
    ax.plot([r["params"] / 1e6 for r in rs], [r["pruned_loss"] for r in rs], "x--", label="pruned")
    ax.plot([r["params"] / 1e6 for r in rs], [r["distilled_loss"] for r in rs], "o-", label="pruned + distilled")
    ax.set(xlabel="parameters (M)", ylabel="held-out loss", title="compressed family")
    ax.legend()
    save_png(fig, path)


# -- command line --------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> None:
    """A real compress run: the planner's flags are refused (they only work with --dry-run)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    given = [f for f in plan_cmd.FLAGS if any(a == f or a.startswith(f + "=") for a in argv)]
    if given:
        raise MegaslimError(f"{', '.join(given)}: planner options, they only work with --dry-run")
    run(cli.parse_args(__doc__, argv))

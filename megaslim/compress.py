"""The compression pipeline (launch/compress.py): rounds of importance -> prune -> distill -> export.

Each round prunes the previous round's distilled student (the first round: `model.load`) to its
target and distills it from the original teacher (or the previous round's model, `compress.teacher`).
Every stage writes its results under <output_dir>/round<N>/; a rerun skips finished stages and resumes
an interrupted distillation.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from megaslim import cli
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
    from megaslim.model.load import resolve_source, source_arch
    from megaslim.prune.plan import target_shape

    rounds = list(cfg.compress.rounds) or [cfg.prune.export_config]
    arch = source_arch(resolve_source(cfg.model.load))
    for i, target in enumerate(rounds):
        try:
            arch = target_shape(arch, target, tp=cfg.parallel.tensor_model_parallel_size, hf_export=True)
        except MegaslimError as err:
            raise MegaslimError(f"compress round {i + 1}: {err}") from None
    if cfg.prune.drop_layers or cfg.prune.plan_path:
        raise MegaslimError("compress takes its targets from compress.rounds / prune.export_config; "
                            "unset prune.drop_layers and prune.plan_path")
    return rounds


def run(cfg: Config) -> dict:
    from megaslim.distill.run import run as run_distill
    from megaslim.prune.run import run as run_prune

    timer = cli.Timer()
    rounds = check(cfg)
    cli.start(cfg)  # even when every stage is already done: rank 0 alone writes the summary
    out = Path(cfg.output_dir)
    source, family = cfg.model.load, []
    for i, target in enumerate(rounds, 1):
        rdir = out / f"round{i}"
        pdir, ddir, hf_dir = rdir / "prune", rdir / "distill", rdir / "hf"
        pruned = _done(pdir / "prune.json")
        if pruned is None:
            _layout(cfg)
            pruned = run_prune(_stage_cfg(cfg, output_dir=str(pdir), model__load=source,
                                          prune__export_config=target, export__hf_dir=None,
                                          importance__only=False))
        teacher = cfg.model.load if cfg.compress.teacher == "original" else source
        distilled = _done(ddir / "distill.json", "finished")
        if distilled is None:
            _layout(cfg)
            resume = (ddir / "checkpoint" / "latest").is_file()
            distilled = run_distill(_stage_cfg(cfg, output_dir=str(ddir), distill__teacher__load=teacher,
                                               distill__student__load=str(pdir / "checkpoint"),
                                               export__hf_dir=str(hf_dir), resume=resume))
        family.append({"round": i, "params": pruned["params_after"], "pruned_loss": pruned["loss_after"],
                       "distilled_loss": distilled["student_eval_loss"],
                       "teacher_loss": distilled["teacher_eval_loss"], "tokens": distilled["tokens"],
                       "prune_seconds": pruned["seconds"], "distill_seconds": distilled["seconds"],
                       "checkpoint": distilled["checkpoint"], "hf_dir": str(hf_dir)})
        source = str(ddir / "checkpoint")
    result = {"source_params": _done(out / "round1" / "prune" / "prune.json")["params_before"],
              "rounds": family, "seconds": timer.seconds}
    if cli.is_rank0():
        cli.write_json(out / "compress.json", result)
        _plot_family(result, out / "family.png")
    _table(result)
    return result


def _table(result: dict) -> None:
    if not cli.is_rank0():
        return
    import math

    from rich.console import Console
    from rich.table import Table

    t = Table(title="megaslim compress: the model family")
    for col in ("model", "params", "held-out loss", "ppl", "tokens", "seconds"):
        t.add_column(col, no_wrap=True)
    first = result["rounds"][0]
    t.add_row("teacher", f"{result['source_params'] / 1e6:.2f}M", f"{first['teacher_loss']:.4f}",
              f"{math.exp(first['teacher_loss']):.2f}", "-", "-")
    for r in result["rounds"]:
        t.add_row(f"round {r['round']} pruned", f"{r['params'] / 1e6:.2f}M", f"{r['pruned_loss']:.4f}",
                  f"{math.exp(r['pruned_loss']):.2f}", "-", f"{r['prune_seconds']:.0f}")
        t.add_row(f"round {r['round']} distilled", f"{r['params'] / 1e6:.2f}M", f"{r['distilled_loss']:.4f}",
                  f"{math.exp(r['distilled_loss']):.2f}", f"{r['tokens']:,}", f"{r['distill_seconds']:.0f}")
    console = Console()
    console.print(t)
    for r in result["rounds"]:
        console.print(f"round {r['round']}: HF export {r['hf_dir']}, checkpoint {r['checkpoint']}", soft_wrap=True)


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

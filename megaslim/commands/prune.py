"""The prune command: importance scores from calibration activations, then width/depth pruning.

torchrun --nproc-per-node N launch/prune.py --config CONFIG [key.sub=value ...]
`importance.only=true` computes and saves the scores and plots without pruning.
Outputs in <output_dir>: importance.safetensors + importance_*.png, prune_plan.json, eval_before.json,
eval.json, checkpoint/ (torch_dist), export.hf_dir / export.megatron_dir (Megatron-LM checkpoint) if set,
prune.json (summary).
`prune.iterative=N` (N > 1, source PP=1) prunes in N steps, re-scoring before each: it also writes
importance_step{i}.safetensors and prune_plan_steps.json (the chain; prune_plan.json is their composition).
`prune.fold_heads=true` folds pruned heads into kept heads of their query group (`prune.fold_mode`:
proj_sum, the measured best, or laco; docs/pruning.md).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from megaslim import checkpoint as ckpt
from megaslim import config, megatron_lm, report
from megaslim import io as mio
from megaslim.commands import cli
from megaslim.config import Config
from megaslim.data.calibration import calibration_rows
from megaslim.data.corpora import data_path
from megaslim.data.heldout import heldout_rows
from megaslim.data.indexed import cached_indexed
from megaslim.distill.short import short_distill
from megaslim.errors import MegaslimError
from megaslim.eval import evaluate_rows
from megaslim.importance.calibrate import check_importance_spec, compute_importance
from megaslim.importance.plots import plot_importance
from megaslim.importance.scores import ImportanceScores
from megaslim.model.arch import ModelArch, check_parallel_layout
from megaslim.model.hf import export_hf
from megaslim.prune.depth import depth_kwargs
from megaslim.prune.iterative import compose_plans, iterative_plans
from megaslim.prune.plan import PrunePlan, build_plan, flops_per_token, target_shape
from megaslim.prune.search import Budget, candidates, rank, table
from megaslim.prune.student import student_from_plan
from megaslim.runtime import ParallelLayout, rank0_print
from megaslim.runtime.layout import check_layout
from megaslim.sources import Source, check_positions, load_model, resolve_source, source_arch
from megaslim.sparsity.apply import Sparsity, prepare_sparsity
from megaslim.tokenizer import load_tokenizer


@dataclass
class Job:
    """The checked request: layout, source, and what decides the plan (read from disk, no model yet)."""
    cfg: Config
    layout: ParallelLayout
    source: Source
    arch: ModelArch
    plan: Optional[PrunePlan]  # prune.plan_path
    scores: Optional[ImportanceScores]  # importance.scores_path
    target: Optional[ModelArch]  # the pruned shape from prune.export_config / drop_layers
    shapes: Optional[list[ModelArch]]  # prune.target_params / target_active_params: the candidates to rank

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def ttp(self) -> int:
        return self.layout.target_tp or self.layout.tp

    @property
    def tpp(self) -> int:
        return self.layout.target_pp or self.layout.pp

    @property
    def iterative(self) -> bool:
        return self.cfg.prune.iterative > 1 and not self.cfg.importance.only

    @property
    def needs_scores(self) -> bool:
        """An importance pass runs: no scores given, and they decide the plan (or are the output)."""
        cfg = self.cfg
        # sparsity alone (no structured target): an identity plan, no importance pass
        sparsity_only = (cfg.prune.sparsity.method is not None and self.plan is None and self.target is not None
                         and self.target == self.arch and cfg.prune.iterative == 1)
        return self.scores is None and (cfg.importance.only or self.plan is None) and not sparsity_only


@dataclass
class Inputs:
    """The data the run reads before any compute."""
    tokenizer: object
    rows: Optional[torch.Tensor]  # calibration rows (importance passes)
    eval_rows: Optional[torch.Tensor]  # held-out rows
    train_prefix: Optional[str]  # the search's short distillation data
    sparsity: Sparsity


@dataclass
class Outcome:
    plan: PrunePlan
    chain: Optional[list[PrunePlan]]  # prune.iterative > 1: the step plans
    steps: list[dict]
    before: dict
    after: dict
    hf_dir: Optional[Path]
    sparsity: Sparsity
    megatron_dir: Optional[Path] = None  # export.megatron_dir, when set


# -- validate --------------------------------------------------------------------------------------


def search_candidates(cfg: Config, arch: ModelArch) -> list[ModelArch]:
    """prune.target_params / target_active_params: the candidate shapes, checked before any compute (also by
    compress; the key clashes and PP=1 are the config's: validate_prune / validate_compress). Experts are
    pruned in memory at the run's EP, so their counts divide it."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    ttp = cfg.prune.target_tensor_model_parallel_size or tp
    tpp = cfg.prune.target_pipeline_model_parallel_size or pp
    sp = cfg.prune.sparsity
    return candidates(arch, Budget.of(cfg.prune), cfg.prune.search, tps=(tp, ttp), pp=tpp,
                      ep=cfg.parallel.expert_model_parallel_size,
                      input_multiple=4 if sp.method and sp.pattern == "2:4" else 1)


def _target(cfg: Config, arch: ModelArch, plan: Optional[PrunePlan], ttp: int):
    """(explicit target shape, search candidates): at most one of them, both None without pruning."""
    if cfg.importance.only:
        return None, None
    if Budget.of(cfg.prune) is not None:
        return None, search_candidates(cfg, arch)
    if plan is not None:
        return None, None
    target = target_shape(arch, cfg.prune.export_config, tp=ttp, hf_export=cfg.export.hf_dir is not None)
    if len(cfg.prune.drop_layers):
        out_of_range = [i for i in cfg.prune.drop_layers if not 0 <= i < arch.num_layers]
        if out_of_range:  # the source's config.json tells, before any importance pass
            raise MegaslimError(f"prune.drop_layers {out_of_range} out of range: the source model has "
                                f"{arch.num_layers} layers (indices 0..{arch.num_layers - 1})")
        if len(set(cfg.prune.drop_layers)) >= arch.num_layers:
            raise MegaslimError(f"prune.drop_layers would drop all {arch.num_layers} layers; keep at least one")
        target = replace(target, num_layers=arch.num_layers - len(set(cfg.prune.drop_layers)))
    return target, None


def _check_iterative(cfg: Config, target: Optional[ModelArch], tp: int) -> None:
    """prune.iterative > 1 (its key clashes and PP=1 are the config's): the steps run at the source TP."""
    if cfg.prune.iterative == 1 or cfg.importance.only:
        return
    check_parallel_layout(target, tp, 1)


def check_outputs(cfg: Config) -> None:
    """output_dir/checkpoint: new, empty, or (importance.only, which writes none) any megaslim checkpoint.
    A rerun never replaces an earlier prune's checkpoint (distill refuses the same rerun)."""
    root = Path(cfg.output_dir) / "checkpoint"
    ckpt.check_output_dir(root)
    if ckpt.is_checkpoint(root) and not cfg.importance.only:
        raise MegaslimError(f"{root} already holds a checkpoint (an earlier prune into output_dir={cfg.output_dir}); "
                            "choose another output_dir, or remove that checkpoint to prune into it again")


def validate(cfg: Config) -> Job:
    """Every check of the request and the plan/scores files, before any data, model or process group."""
    config.validate(cfg)  # load_config ran it; configs built in code (compress stages) need it too
    config.validate_prune(cfg)
    config.check_output_dir_writable(cfg.output_dir)
    if cfg.export.hf_dir:
        config.check_output_dir_writable(cfg.export.hf_dir, "export.hf_dir")
    if cfg.export.megatron_dir:
        config.check_output_dir_writable(cfg.export.megatron_dir, "export.megatron_dir")
        megatron_lm.check_export_dir(Path(cfg.export.megatron_dir))
    layout = ParallelLayout.from_config(cfg)
    ttp, tpp = layout.target_tp or layout.tp, layout.target_pp or layout.pp
    check_layout(layout.world_size, ttp, tpp)
    source = resolve_source(cfg.model.load)
    arch = source_arch(source)
    check_parallel_layout(arch, layout.tp, layout.pp)
    check_positions(arch, cfg.data.seq_length)
    plan = None
    if cfg.prune.plan_path:
        plan = PrunePlan.load(cfg.prune.plan_path)
        plan.check_applies_to(arch)
    scores = ImportanceScores.load(cfg.importance.scores_path, arch) if cfg.importance.scores_path else None
    target, shapes = _target(cfg, arch, plan, ttp)
    _check_iterative(cfg, target, layout.tp)
    if plan is not None or target is not None:
        check_parallel_layout(plan.target_arch if plan else target, ttp, tpp)
    for shape in shapes or []:
        check_parallel_layout(shape, ttp, tpp)
    check_outputs(cfg)
    job = Job(cfg, layout, source, arch, plan, scores, target, shapes)
    if job.needs_scores or job.iterative:
        check_importance_spec(cfg.model.transformer_impl)
    if job.needs_scores:  # block_loss / greedy_loss against the source's layer count (layer_blocks <= k)
        depth_kwargs(cfg.prune, cfg.importance.layer_metrics, arch.num_layers,
                     target.num_layers if target is not None else None)
    return job


def check(cfg: Config) -> Inputs:
    """`launch/prune.py --check`: validate, then read what build() reads (tokenizer, rows), no model."""
    return build(validate(cfg))


# -- build -----------------------------------------------------------------------------------------


def build(job: Job) -> Inputs:
    """Tokenizer, calibration / held-out / training data and the sparsity set-up, read before compute."""
    cfg = job.cfg
    tokenizer = load_tokenizer(cfg.model, job.source)
    rows = eval_rows = train_prefix = None
    if job.needs_scores or job.iterative:
        rows = calibration_rows(cfg.data.calib_path, tokenizer, num_samples=cfg.importance.num_samples,
                                seq_length=cfg.data.seq_length)
    if not cfg.importance.only:
        eval_rows = heldout_rows(cfg.data.eval_path, tokenizer, seq_length=cfg.data.seq_length,
                                 num_samples=cfg.eval.num_samples)
    if job.shapes and cfg.prune.search.train_iters > 0:
        train_prefix = cached_indexed(data_path(cfg.data.train_path, "data.train_path"), tokenizer)
    # prune.sparsity: checked (wanda's rows read) before compute
    pruned_arch = None if cfg.importance.only else job.plan.target_arch if job.plan else job.target
    sparsity = prepare_sparsity(cfg, pruned_arch, tokenizer=tokenizer)
    return Inputs(tokenizer, rows, eval_rows, train_prefix, sparsity)


# -- run -------------------------------------------------------------------------------------------


def importance(job: Job, inputs: Inputs, model, arch: ModelArch) -> tuple[Optional[ImportanceScores], dict]:
    """The importance pass when the job needs one (scores, its cost); saved with plots on rank 0."""
    if not job.needs_scores:
        return job.scores, {}
    cfg = job.cfg
    keep = job.target.num_layers if job.target is not None else None
    scores, cost = compute_importance(model, arch, inputs.rows, cfg.importance,
                                      micro_batch_size=cfg.data.micro_batch_size,
                                      transformer_impl=cfg.model.transformer_impl,
                                      **depth_kwargs(cfg.prune, cfg.importance.layer_metrics, arch.num_layers, keep))
    if report.is_rank0():
        scores.save(job.out_dir / "importance.safetensors")
        plot_importance(scores, job.out_dir)
        mio.write_json(job.out_dir / "importance.json", {"model": job.source.label, **cost,
                                                         "settings": scores.settings})
    score_table(scores, cost, job.out_dir)
    return scores, cost


def search(job: Job, inputs: Inputs, model, arch: ModelArch, scores) -> ModelArch:
    """Rank the candidates (each briefly distilled when prune.search.train_iters > 0), write search.json,
    return the best shape."""
    cfg, out_dir = job.cfg, job.out_dir
    train = None
    if cfg.prune.search.train_iters > 0:
        def train(student, student_arch, i):
            return short_distill(cfg, student, student_arch, model, arch, inputs.eval_rows, inputs.train_prefix,
                                 inputs.tokenizer, out_dir / "search" / f"candidate{i}")
    ranked = rank(cfg, model, arch, job.shapes, scores, inputs.eval_rows, train=train)
    table(ranked, Budget.of(cfg.prune), cfg.prune.search.train_iters)
    dist.barrier()
    if report.is_rank0():
        shutil.rmtree(out_dir / "search", ignore_errors=True)  # the candidates' data cache
        mio.write_json(out_dir / "search.json", {
            "target_params": cfg.prune.target_params, "target_active_params": cfg.prune.target_active_params,
            "train_iters": cfg.prune.search.train_iters,
            "ranking": [r.to_dict() for r in ranked]})
    return ranked[0].arch


def iterate(cfg: Config, model, arch: ModelArch, target: ModelArch, scores, rows, eval_rows, out_dir: Path):
    """prune.iterative > 1: the chain of step plans, re-scoring the partly pruned model before each step."""
    steps = []

    def score(m, a, i):
        s, _ = compute_importance(m, a, rows, cfg.importance, micro_batch_size=cfg.data.micro_batch_size,
                                  transformer_impl=cfg.model.transformer_impl)
        if report.is_rank0():
            s.save(out_dir / f"importance_step{i}.safetensors")
        return s

    def on_step(i, plan, pruned):
        t = plan.target_arch
        row = {"step": i, "params": t.num_params(), **{k: getattr(t, k) for k in (
            "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")}}
        if pruned is not None:
            row["loss"] = evaluate_rows(pruned, eval_rows, vocab_size=arch.vocab_size,
                                        micro_batch_size=cfg.data.micro_batch_size)["loss"]
        steps.append(row)
        rank0_print(f"iterative step {i + 1}/{cfg.prune.iterative}: {row}")

    chain = iterative_plans(model, arch, target, cfg.prune.iterative, score=score, model_cfg=cfg.model,
                            tp=cfg.parallel.tensor_model_parallel_size, first_scores=scores, on_step=on_step,
                            layer_metric=cfg.prune.layer_metric, contiguous=cfg.prune.drop_contiguous,
                            fold_heads=cfg.prune.fold_heads and cfg.prune.fold_mode)
    return chain, steps


def make_plan(job: Job, inputs: Inputs, model, arch: ModelArch, scores):
    """(plan, chain of step plans or None, iterative step records): given, searched, iterated or built."""
    cfg, p = job.cfg, job.cfg.prune
    if job.plan is not None:
        return job.plan, None, []
    target = search(job, inputs, model, arch, scores) if job.shapes else job.target
    if p.iterative > 1:
        chain, steps = iterate(cfg, model, arch, target, scores, inputs.rows, inputs.eval_rows, job.out_dir)
        return compose_plans(chain, drop_folds=True), chain, steps
    plan = build_plan(arch, target, scores, drop_layers=p.drop_layers, layer_metric=p.layer_metric,
                      contiguous=p.drop_contiguous, fold_heads=p.fold_heads and p.fold_mode,
                      layer_blocks=p.layer_blocks, expert_metric=p.expert_metric)
    return plan, None, []


def prune(job: Job, inputs: Inputs, model, arch: ModelArch, scores) -> Outcome:
    """Plan, prune into the target layout (the teacher's weights freed once written), sparsify, evaluate,
    save the checkpoint and the HF export."""
    cfg, mbs = job.cfg, job.cfg.data.micro_batch_size
    before = evaluate_rows(model, inputs.eval_rows, vocab_size=arch.vocab_size, micro_batch_size=mbs)
    plan, chain, steps = make_plan(job, inputs, model, arch, scores)
    plan_table(plan, cfg.data.seq_length)
    pruned = student_from_plan(model, chain or plan, cfg.model, scratch=job.out_dir / ".pruned_full.partial",
                               target_tp=job.ttp, target_pp=job.tpp, seed=cfg.train.seed, release_teacher=True)
    del model
    inputs.sparsity.apply(pruned, plan.target_arch, job.out_dir, micro_batch_size=mbs)  # no-op without sparsity
    after = evaluate_rows(pruned, inputs.eval_rows, vocab_size=arch.vocab_size, micro_batch_size=mbs)
    tokenizer_dir = cfg.model.tokenizer or job.source.tokenizer_dir
    ckpt.save_checkpoint(pruned, plan.target_arch, job.out_dir / "checkpoint", 0, tokenizer_dir=tokenizer_dir,
                         extra={"pruned_from": job.source.label, **inputs.sparsity.extra()},
                         sharded_extra=inputs.sparsity.sharded(pruned))
    hf_dir = None
    if cfg.export.hf_dir:
        hf_dir = export_hf(pruned, plan.target_arch, cfg.export.hf_dir, tokenizer_dir=tokenizer_dir,
                           source=str(job.out_dir))
    mlm_dir = None
    if cfg.export.megatron_dir:
        mlm_dir = megatron_lm.export_megatron_lm(pruned, plan.target_arch, cfg.export.megatron_dir, iteration=0,
                                                 divisible_by=cfg.model.make_vocab_size_divisible_by,
                                                 tokenizer_dir=tokenizer_dir)
    return Outcome(plan, chain, steps, before, after, hf_dir, inputs.sparsity, mlm_dir)


# -- report ----------------------------------------------------------------------------------------


def score_table(scores: ImportanceScores, cost: dict, out_dir: Path) -> None:
    rows = [
        ("calibration", f"{scores.settings.get('num_samples')} samples x {scores.settings.get('seq_length')} tokens"),
        ("aggregation", f"seq_agg={scores.settings.get('seq_agg')} batch_agg={scores.settings.get('batch_agg')} "
                        f"neuron_signal={scores.settings.get('neuron_signal')}"),
        ("least important layers (BI)", torch.argsort(scores.layer_bi)[:5].tolist()),
    ]
    if scores.layer_loss is not None:
        rows.append(("least important layers (loss)", torch.argsort(scores.layer_loss)[:5].tolist()))
    if cost:
        rows += [("seconds", round(cost["seconds"], 1)),
                 ("tokens/s (activation pass)", round(cost["tokens_per_second"]))]
    rows.append(("outputs", out_dir))
    report.summary_table("megaslim importance", rows)


def plan_table(plan: PrunePlan, seq_length: int) -> None:
    if not report.is_rank0():
        return
    a, b = plan.source_arch, plan.target_arch
    t = Table(title="prune plan")
    for col in ("", "source", "pruned"):
        t.add_column(col)
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels"):
        t.add_row(key, str(getattr(a, key)), str(getattr(b, key)))
    t.add_row("params", f"{a.num_params():,}", f"{b.num_params():,} ({b.num_params() / a.num_params():.1%})")
    if a.is_moe:  # what one token runs through (top-k experts)
        for key in ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            t.add_row(key, str(getattr(a, key)), str(getattr(b, key)))
        t.add_row("active params", f"{a.num_active_params():,}",
                  f"{b.num_active_params():,} ({b.num_active_params() / a.num_active_params():.1%})")
    t.add_row(f"GFLOPs/token (seq {seq_length})", f"{flops_per_token(a, seq_length) / 1e9:.3f}",
              f"{flops_per_token(b, seq_length) / 1e9:.3f}")
    dropped = sorted(set(range(a.num_layers)) - set(plan.keep_layers))
    t.add_row("dropped layers", "", str(dropped) if dropped else "-")
    Console().print(t)


def finish(job: Job, arch: ModelArch, out: Outcome, timer: report.Timer) -> dict:
    """Write the plan(s), evaluations and prune.json on rank 0; print the summary; the prune.json record."""
    out_dir, plan, before, after = job.out_dir, out.plan, out.before, out.after
    if report.is_rank0():
        plan.save(out_dir / "prune_plan.json")
        if out.chain:
            mio.write_json(out_dir / "prune_plan_steps.json", [json.loads(p.to_json()) for p in out.chain])
        for name, res in (("eval_before.json", before), ("eval.json", after)):
            mio.write_json(out_dir / name, res)
    result = {
        "source": job.source.label, "params_before": arch.num_params(),
        "params_after": plan.target_arch.num_params(), "loss_before": before["loss"],
        "loss_after": after["loss"], "seconds": timer.seconds, "checkpoint": str(out_dir / "checkpoint"),
        "hf_dir": str(out.hf_dir) if out.hf_dir else None, "target_tp": job.ttp, "target_pp": job.tpp,
        "megatron_dir": str(out.megatron_dir) if out.megatron_dir else None,
        "fold_heads": bool(plan.fold_heads or any(p.fold_heads for p in out.chain or [])),
        "iterative": job.cfg.prune.iterative, "steps": out.steps, "sparsity": out.sparsity.summary()}
    if arch.is_moe:
        result.update(active_params_before=arch.num_active_params(),
                      active_params_after=plan.target_arch.num_active_params())
    if report.is_rank0():
        mio.write_json(out_dir / "prune.json", result)
    report.summary_table("megaslim prune", [
        ("model", job.source.label),
        ("params", f"{arch.num_params():,} -> {plan.target_arch.num_params():,}"),
        ("held-out loss (ppl)",
         f"{before['loss']:.4f} ({before['ppl']:.2f}) -> {after['loss']:.4f} ({after['ppl']:.2f})"),
        ("layout", f"TP={job.layout.tp} PP={job.layout.pp} -> TP={job.ttp} PP={job.tpp}"),
        ("seconds", round(timer.seconds, 1)),
        ("checkpoint", out_dir / "checkpoint"), ("hf_dir", out.hf_dir or "-"),
        ("megatron_dir", out.megatron_dir or "-"),
    ])
    return result


# -- the command -----------------------------------------------------------------------------------


def run(cfg: Config) -> dict:
    """The whole prune command for `cfg`; returns the prune.json record (or the importance record)."""
    timer = report.Timer()
    job = validate(cfg)
    inputs = build(job)
    cli.start(cfg)
    model, arch, _ = load_model(cfg.model, job.source)
    scores, cost = importance(job, inputs, model, arch)
    cli.save_run_config(cfg)  # rank 0 writes
    if cfg.importance.only:
        return {"importance": str(job.out_dir / "importance.safetensors"), **cost}
    out = prune(job, inputs, model, arch, scores)
    del model
    return finish(job, arch, out, timer)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(cli.parse_args(__doc__, argv))

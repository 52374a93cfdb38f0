"""The dry-run planner (`launch/compress.py --config CONFIG --dry-run`): what a compress run costs, before
any GPU, weight or torch.distributed is touched.

Per stage (the teacher, each round's pruning, each round's distillation) it prints parameters (a mixture of
experts' active parameters beside them), forward FLOPs/token and the memory per GPU
(megaslim.commands.planning) at the configured TP/PP/EP and DP = nodes * gpus_per_node / (TP * PP), and
refuses layouts that do not divide or do not fit.

Time = tokens * FLOPs/token / (GPUs * --gpu-tflops * --mfu); distillation FLOPs/token = 3 * F(student)
(forward + backward) + F(teacher) (forward); tokens = train_iters * global_batch_size * seq_length.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console
from rich.table import Table

from megaslim import io as mio
from megaslim.commands import cli
from megaslim.commands.planning import (
    GIB,
    PlanError,
    distill_memory,
    dtype_bytes,
    embedding_params,
    forward_memory,
    hf_heads_rule,
    layer_activation_elems,
    source_shape,
    stage_params_rank,
)
from megaslim.config import Config, validate_compress
from megaslim.distill.train import resolve_pairs
from megaslim.errors import MegaslimError
from megaslim.model.arch import ModelArch, check_parallel_layout
from megaslim.prune.plan import flops_per_token, target_shape
from megaslim.prune.search import Budget, candidates
from megaslim.runtime import ParallelLayout


@dataclass
class PlannerOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    gpu_tflops: float = 989.0  # H100 SXM dense bf16
    mfu: float = 0.4
    overhead_gib: float = 4.0
    hf_config: Optional[str] = None

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise PlanError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        for name in ("gpu_memory_gib", "gpu_tflops"):
            if not getattr(self, name) > 0:
                raise PlanError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        if not 0 < self.mfu <= 1:
            raise PlanError(f"--mfu must be in (0, 1] (got {self.mfu})")
        if self.overhead_gib < 0:
            raise PlanError(f"--overhead-gib must be >= 0 (got {self.overhead_gib})")


@dataclass
class Stage:
    name: str
    kind: str  # teacher | prune | distill
    shape: str = ""
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (item, value, how)
    params: Optional[int] = None
    active_params: Optional[int] = None  # an MoE's parameters per token (top-k experts); None for dense models
    flops: Optional[int] = None
    memory_gib: Optional[float] = None  # peak per GPU
    hours: Optional[float] = None
    fits: Optional[bool] = None
    problems: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)

    def add(self, item: str, value: str, how: str = "") -> None:
        self.rows.append((item, value, how))


@dataclass
class Plan:
    config: Optional[str]
    source: str
    options: PlannerOptions
    tp: int
    pp: int
    dp: int
    stages: list[Stage]
    notes: list[str]

    @property
    def problems(self) -> list[str]:
        return [f"{s.name}: {p}" for s in self.stages for p in s.problems]

    @property
    def fits(self) -> bool:
        return not self.problems

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


@dataclass(frozen=True)
class _Job:
    """What every stage's figures depend on: the layout, the sequence and the achieved FLOP rate."""
    cfg: Config
    opts: PlannerOptions
    layout: ParallelLayout
    micro: int  # micro-batches per step per DP rank
    flash: bool

    @property
    def s(self) -> int:
        return self.cfg.data.seq_length

    @property
    def rate(self) -> float:  # achieved FLOP/s of the whole job
        return self.opts.world * self.opts.gpu_tflops * 1e12 * self.opts.mfu

    @property
    def budget(self) -> float:
        return self.opts.gpu_memory_gib * GIB

    @property
    def overhead(self) -> float:
        return self.opts.overhead_gib * GIB


# -- formatting ----------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f}"


def _big(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:,.0f}"


def _hours(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days ({seconds / 3600:,.0f} h)"


def _shape_str(a: ModelArch) -> str:
    ffn = f"ffn {a.ffn_hidden_size}"
    if a.is_moe:
        ffn = f"{a.num_moe_experts} experts (top-{a.moe_router_topk}) x ffn {a.moe_ffn_hidden_size}" + (
            f" + shared ffn {a.moe_shared_expert_intermediate_size}" if a.moe_shared_expert_intermediate_size else "")
    return (f"{a.num_layers} layers, hidden {a.hidden_size}, {ffn}, {a.num_attention_heads} heads "
            f"in {a.num_query_groups} groups x {a.kv_channels}, vocab {a.vocab_size}")


def _active(a: ModelArch) -> Optional[int]:
    return a.num_active_params() if a.is_moe else None


def _params_str(n: int, active: Optional[int]) -> str:
    return _big(n) + (f" ({_big(active)} active)" if active is not None else "")


def _fit(total: float, budget: float) -> str:
    return "fits" if total <= budget else f"DOES NOT FIT (over by {_gib(total - budget)} GiB)"


def _too_big(total: float, job: _Job, parts: dict, what: str) -> str:
    items = sorted(((k, v) for k, v in parts.items() if isinstance(v, (int, float)) and k not in
                    ("stage", "in_flight", "params_rank", "teacher_params_rank", "full recompute")),
                   key=lambda kv: -kv[1])
    top = ", ".join(f"{k} {_gib(v)}" for k, v in items[:3])
    lay = job.layout
    return (f"{what} needs {_gib(total)} GiB per GPU on pipeline stage {parts['stage']} at TP {lay.tp} PP {lay.pp} "
            f"DP {lay.dp}, over the {_gib(job.budget)} GiB of --gpu-memory-gib (largest: {top} GiB); raise TP or "
            "PP, lower the micro-batch size, or add nodes (DP shards the optimizer state)")


# -- validate: layout, schedule, round targets ---------------------------------------------------


def _layout(cfg: Config, opts: PlannerOptions) -> ParallelLayout:
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    try:
        return ParallelLayout.from_config(cfg, world_size=opts.world)
    except MegaslimError:  # said in the planner's terms: nodes x GPUs, not a launcher's world size
        raise PlanError(f"{opts.nodes} node(s) x {opts.gpus_per_node} GPUs = {opts.world} GPUs do not split into "
                        f"TP {tp} x PP {pp} x DP: the GPU count must be a multiple of TP x PP = {tp * pp}") from None


def _micro_batches(cfg: Config, layout: ParallelLayout, opts: PlannerOptions) -> int:
    t = cfg.train
    try:
        return layout.check_global_batch(t.global_batch_size, t.micro_batch_size)
    except MegaslimError:  # said with the GPU count the DP comes from
        raise PlanError(f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size"
                        f" x DP = {t.micro_batch_size} x {layout.dp} (DP = {opts.world} GPUs / (TP {layout.tp} x "
                        f"PP {layout.pp}))") from None


def _layout_problems(arch: ModelArch, layout: ParallelLayout, what: str) -> list[str]:
    try:
        check_parallel_layout(arch, layout.tp, layout.pp, layout.ep)
    except MegaslimError as err:
        return [f"{what}: {err}"]
    return []


def _searched_round(cfg: Config, source: ModelArch, tp: int, prune_tp: int, ep: int) -> ModelArch:
    """prune.target_params / target_active_params: the search's largest candidate (most parameters: under an
    active budget the nearest to it may hold fewer experts than another) bounds the student's size."""
    try:
        found = candidates(source, Budget.of(cfg.prune), cfg.prune.search, tps=(tp, prune_tp),
                           pp=cfg.prune.target_pipeline_model_parallel_size
                           or cfg.parallel.pipeline_model_parallel_size, ep=ep)
        return max(found, key=lambda a: (a.num_params(), a.num_active_params()))
    except MegaslimError as err:
        raise PlanError(str(err)) from None


def _rounds(cfg: Config, source: ModelArch, tp: int, ep: int = 1) -> list[ModelArch]:
    """The round targets, shaped as the compress command checks them (before anything runs)."""
    prune_tp = cfg.prune.target_tensor_model_parallel_size or tp
    if Budget.of(cfg.prune) is not None:
        return [_searched_round(cfg, source, tp, prune_tp, ep)]
    out, cur = [], source
    for i, target in enumerate(list(cfg.compress.rounds) or [cfg.prune.export_config], 1):
        try:
            # as the compress command checks, except that transformers' hidden % heads rule is a Llama-family one
            arch = target_shape(cur, target, tp=tp, hf_export=hf_heads_rule(source))
            if prune_tp != tp:
                target_shape(cur, target, tp=prune_tp, hf_export=False)
        except MegaslimError as err:
            raise PlanError(f"compress round {i}: {err}") from None
        cur = arch
        out.append(cur)
    return out


def _validate(cfg: Config, opts: PlannerOptions, config_path) -> tuple[_Job, ModelArch, str, list[ModelArch]]:
    """Everything that can refuse the run outright, layout first."""
    opts.check()
    layout = _layout(cfg, opts)
    validate_compress(cfg)  # what the compress command refuses from the config alone
    source, origin = source_shape(cfg, hf_config=opts.hf_config, config_path=config_path)
    problems = _layout_problems(source, layout, "teacher")
    if problems:
        raise PlanError(problems[0])
    rounds = _rounds(cfg, source, layout.tp, layout.ep)
    micro = _micro_batches(cfg, layout, opts)
    for i, r in enumerate(rounds, 1):
        problems += _layout_problems(r, layout, f"round {i} student")
    if problems:
        raise PlanError("; ".join(problems))
    return _Job(cfg, opts, layout, micro, cfg.model.transformer_impl != "local"), source, origin, rounds


# -- build: one Stage per teacher / prune / distill ----------------------------------------------


def _teacher_stage(job: _Job, source: ModelArch) -> Stage:
    st = Stage("teacher", "teacher", params=source.num_params(), flops=flops_per_token(source, job.s),
               shape=_shape_str(source), active_params=_active(source))
    st.add("parameters", f"{st.params:,}", f"{_big(st.params)}; embeddings {_big(embedding_params(source))}")
    if st.active_params is not None:
        st.add("active parameters", f"{st.active_params:,}", f"{_big(st.active_params)}: top-"
               f"{source.moe_router_topk} of {source.num_moe_experts} experts per token")
    st.add("FLOPs/token (forward)", _big(st.flops), f"seq_length {job.s}")
    return st


def _prune_seconds(job: _Job, prev: ModelArch, student: ModelArch) -> float:
    """Importance on this round's source (calibration + layer-loss passes), then eval before/after."""
    cfg, s = job.cfg, job.s
    passes = cfg.importance.num_samples * s * flops_per_token(prev, s)
    if "loss" in cfg.importance.layer_metrics:
        passes += cfg.importance.layer_loss_samples * s * prev.num_layers * flops_per_token(prev, s)
    passes += cfg.eval.num_samples * s * (flops_per_token(prev, s) + flops_per_token(student, s))
    return passes / job.rate


def _prune_stage(job: _Job, i: int, prev: ModelArch, student: ModelArch) -> Stage:
    cfg, opts, s, lay = job.cfg, job.opts, job.s, job.layout
    ps = Stage(f"round {i} prune", "prune", params=student.num_params(), flops=flops_per_token(student, s),
               shape=_shape_str(student), active_params=_active(student))
    b = cfg.data.micro_batch_size
    total, parts = forward_memory(cfg, prev, tp=lay.tp, pp=lay.pp, b=b, flash=job.flash, overhead=job.overhead,
                                  ep=lay.ep)
    secs = _prune_seconds(job, prev, student)
    host = stage_params_rank(prev, tp=1, pp=lay.pp, stage=0, divisible_by=1, ep=lay.ep) * (
        4 if lay.tp == 1 else dtype_bytes(cfg))
    ps.memory_gib, ps.hours, ps.fits = total / GIB, secs / 3600, total <= job.budget
    ps.numbers = dict(parts, total=total, seconds=secs)
    ps.add("parameters", f"{prev.num_params():,} -> {ps.params:,}",
           f"{_big(ps.params)} ({100 * ps.params / prev.num_params():.1f}%)" + (
               "; layers dropped as one contiguous block" if cfg.prune.drop_contiguous
               and student.num_layers < prev.num_layers else ""))
    if ps.active_params is not None:
        ps.add("active parameters", f"{prev.num_active_params():,} -> {ps.active_params:,}",
               f"{_big(ps.active_params)} ({100 * ps.active_params / prev.num_active_params():.1f}%)")
    ps.add("FLOPs/token (forward)", f"{_big(flops_per_token(prev, s))} -> {_big(ps.flops)}", f"seq_length {s}")
    ps.add("weights / GPU", _gib(parts["weights"]) + " GiB", f"{cfg.model.params_dtype}, TP {lay.tp} PP {lay.pp}")
    ps.add("activations / GPU", _gib(parts["activations"]) + " GiB",
           f"forward only, one layer, data.micro_batch_size {b}")
    ps.add("logits / GPU", _gib(parts["logits"]) + " GiB", "last stage: bf16 + fp32 log-softmax")
    ps.add("peak / GPU", f"{_gib(total)} / {opts.gpu_memory_gib:g} GiB", _fit(total, job.budget)
           + f", stage {parts['stage']}, +{opts.overhead_gib:g} GiB overhead")
    ps.add("host RAM / process (slicing)", _gib(host) + " GiB",
           f"full stage tensors gathered per rank; x{min(opts.gpus_per_node, opts.world)} per node")
    ps.add("time", _hours(secs), f"{cfg.importance.num_samples} calibration samples"
           + (f" + {cfg.importance.layer_loss_samples} x {prev.num_layers} layer-loss passes"
              if "loss" in cfg.importance.layer_metrics else "") + " + eval before/after")
    if not ps.fits:
        ps.problems.append(_too_big(total, job, parts, "importance forward"))
    return ps


def _distill_seconds(job: _Job, f_train: int, f_s: int, f_t: int) -> tuple[int, float]:
    """(tokens, seconds): the training steps plus the eval passes (every eval.interval, first and last)."""
    cfg, t, s = job.cfg, job.cfg.train, job.s
    tokens = t.train_iters * t.global_batch_size * s
    evals = (t.train_iters // cfg.eval.interval if cfg.eval.interval else 0) + 2
    eval_flops = evals * cfg.eval.num_samples * s * f_s + cfg.eval.num_samples * s * f_t
    return tokens, (tokens * f_train + eval_flops) / job.rate


def _distill_rows(ds: Stage, job: _Job, student: ModelArch, parts: dict, total: float) -> None:
    """The memory breakdown rows of a distillation stage."""
    cfg, lay, s, w = job.cfg, job.layout, job.s, dtype_bytes(job.cfg)
    act = layer_activation_elems(student, s=s, b=cfg.train.micro_batch_size, tp=lay.tp, flash=job.flash) * w
    opt_how = f"{12 if w < 4 else 8} B/param" + (f" / DP {lay.dp} (distributed optimizer)" if lay.dp > 1 else "")
    if student.is_moe and lay.ep > 1:
        opt_how += f"; experts / (DP / EP {lay.ep})"
    for key, how in (("student weights", f"{parts['params_rank']:,} params/GPU x {w} B"),
                     ("student grads", "x 4 B (fp32 grad buffer)"),
                     ("optimizer state", opt_how),
                     ("teacher weights", f"{parts['teacher_params_rank']:,} params/GPU x {w} B, frozen"),
                     ("student activations", f"{parts['in_flight']} x {student.num_layers // lay.pp} layers x "
                      f"{_gib(act)} GiB/layer ({'flash' if job.flash else 'unfused'} attention, no recompute; "
                      f"full recompute would need {_gib(parts['full recompute'])} GiB)"),
                     ("teacher activations", "one layer (no_grad) + PP stage buffers"),
                     ("KD logits", f"s*b*V/TP x {2 * w + 20} B" if parts["stage"] == lay.pp - 1
                      else "not on this stage"),
                     ("overhead", "CUDA context, NCCL, fragmentation (--overhead-gib)")):
        ds.add(key, _gib(parts[key]) + " GiB", how)
    ds.add("peak / GPU", f"{_gib(total)} / {job.opts.gpu_memory_gib:g} GiB", _fit(total, job.budget)
           + f", on pipeline stage {parts['stage']} (PP {lay.pp})")


def _distill_stage(job: _Job, i: int, student: ModelArch, teacher: ModelArch, original: bool) -> Stage:
    cfg, t, s, lay, opts = job.cfg, job.cfg.train, job.s, job.layout, job.opts
    ds = Stage(f"round {i} distill", "distill", params=student.num_params(), active_params=_active(student))
    try:
        pairs = resolve_pairs(cfg, student, teacher, lay.pp)
    except MegaslimError as err:
        raise PlanError(f"round {i} distillation: {err}") from None
    f_s, f_t = flops_per_token(student, s), flops_per_token(teacher, s)
    ds.flops = 3 * f_s + f_t
    tokens, secs = _distill_seconds(job, ds.flops, f_s, f_t)
    total, parts = distill_memory(cfg, student, teacher, tp=lay.tp, pp=lay.pp, dp=lay.dp, micro=job.micro,
                                  flash=job.flash, overhead=job.overhead, ep=lay.ep)
    ds.memory_gib, ds.hours, ds.fits = total / GIB, secs / 3600, total <= job.budget
    ds.numbers = dict(parts, total=total, seconds=secs, tokens=tokens, micro_batches=job.micro)
    kd = "logit KD" + (f" + intermediate {cfg.distill.intermediate_loss} on {len(pairs)} layer pairs "
                       f"{[list(p) for p in pairs]}" if pairs else " only") + f" ({cfg.distill.kl} KL)"
    ds.add("student / teacher", f"{_params_str(student.num_params(), _active(student))} / "
           f"{_params_str(teacher.num_params(), _active(teacher))}",
           f"teacher: {'original model' if original else f'round {i - 1} student'}; {kd}")
    ds.add("layout", f"TP {lay.tp} x PP {lay.pp} x DP {lay.dp} = {opts.world} GPUs",
           f"{job.micro} micro-batches of {t.micro_batch_size} x {s} tokens per step per DP rank; "
           f"{parts['in_flight']} in flight on stage {parts['stage']}")
    _distill_rows(ds, job, student, parts, total)
    ds.add("FLOPs/token (train)", _big(ds.flops), f"3 x {_big(f_s)} (student) + {_big(f_t)} (teacher fwd)")
    ds.add("tokens", f"{tokens:,}", f"{t.train_iters:,} iters x {t.global_batch_size} x {s} "
           f"(= {_big(tokens)}); LR {t.lr:g} -> {t.min_lr:g} cosine, {t.warmup_iters} warmup")
    ds.add("time", _hours(secs), f"{opts.world} GPUs x {opts.gpu_tflops:g} TFLOP/s x MFU {opts.mfu:g}; "
           f"{secs * opts.world / 3600:,.0f} GPU-hours; compute only (no loading/saving)")
    if not ds.fits:
        ds.problems.append(_too_big(total, job, parts, "distillation"))
    return ds


def _stages(job: _Job, source: ModelArch, rounds: list[ModelArch]) -> list[Stage]:
    stages, prev = [_teacher_stage(job, source)], source
    for i, student in enumerate(rounds, 1):
        stages.append(_prune_stage(job, i, prev, student))
        original = job.cfg.compress.teacher == "original"
        stages.append(_distill_stage(job, i, student, source if original else prev, original))
        prev = student
    return stages


def _notes(job: _Job, source: ModelArch, stages: list[Stage]) -> list[str]:
    cfg, t, s = job.cfg, job.cfg.train, job.s
    notes = []
    if not hf_heads_rule(source):
        notes.append(f"{source.family}: transformers' hidden % heads rule (Llama-family configs) is not "
                     "applied to the targets; its HF config carries head_dim.")
    budget = Budget.of(cfg.prune)
    if budget is not None:
        notes.append(f"{budget.key}={budget.value:,.0f}: the run ranks the "
                     f"{cfg.prune.search.top_k} shapes nearest the budget after "
                     f"{cfg.prune.search.train_iters} distillation steps each; the plan sizes the largest.")
    if job.flash:
        notes.append("selective recompute would save nothing here: flash attention (Transformer Engine) keeps no "
                     "s^2 attention scores; full recompute (not exposed by megaslim yet) would keep only each layer's "
                     "input, w*s*b*h per layer (figure in the student activations row).")
    else:
        notes.append("model.transformer_impl=local: unfused attention stores a*s^2*b scores per layer (what "
                     "selective recompute would drop); use transformer_engine/modelopt on GPUs (flash attention).")
    tc = cfg.compress.teacher_correction_iters
    if tc:
        tc_tokens = tc * t.global_batch_size * s
        notes.append(f"teacher correction first: {tc:,} LM-loss steps of the teacher ({_big(tc_tokens)} tokens, "
                     f"~{_hours(tc_tokens * 3 * flops_per_token(source, s) / job.rate)} compute); its memory is "
                     "that of training a teacher-sized model (not sized here)")
    if budget is not None and cfg.prune.search.train_iters:
        se = cfg.prune.search
        se_tokens = se.top_k * se.train_iters * t.global_batch_size * s
        notes.append(f"shape search: {se.top_k} candidates x {se.train_iters} distillation steps "
                     f"({_big(se_tokens)} tokens, ~{_hours(se_tokens * stages[-1].flops / job.rate)} compute) "
                     "inside the round 1 prune stage")
    return notes


def plan(cfg: Config, opts: Optional[PlannerOptions] = None, *, config_path: Optional[str | Path] = None) -> Plan:
    """Build the dry-run plan of `launch/compress.py` for `cfg`. Raises PlanError for targets or layouts that
    cannot run at all (do not divide); memory that does not fit is reported in `Plan.problems`."""
    opts = opts or PlannerOptions()
    job, source, origin, rounds = _validate(cfg, opts, config_path)
    stages = _stages(job, source, rounds)
    lay = job.layout
    return Plan(config=str(config_path) if config_path else None, source=origin, options=opts, tp=lay.tp,
                pp=lay.pp, dp=lay.dp, stages=stages, notes=_notes(job, source, stages))


# -- report --------------------------------------------------------------------------------------


def _stage_table(s: Stage, console: Console) -> Table:
    title = f"{s.name}: {s.shape}" if s.shape else s.name
    table = Table(title=title, show_header=True, title_justify="left", min_width=min(len(title), console.width))
    table.add_column("item", style="bold")
    table.add_column("value", justify="right")
    table.add_column("how")
    for item, value, how in s.rows:
        table.add_row(item, value, how)
    return table


def _summary_table(p: Plan) -> Table:
    summary = Table(title="summary", title_justify="left")
    for col in ("stage", "params", "FLOPs/token", "peak GiB/GPU", "time", "fits"):
        summary.add_column(col)
    for s in p.stages:
        summary.add_row(s.name, _params_str(s.params, s.active_params) if s.params else "-",
                        _big(s.flops) if s.flops else "-",
                        f"{s.memory_gib:.1f}" if s.memory_gib is not None else "-",
                        _hours(s.hours * 3600) if s.hours is not None else "-",
                        "-" if s.fits is None else ("yes" if s.fits else "NO"))
    total_h = sum(s.hours or 0 for s in p.stages)
    summary.add_row("total", "", "", "", _hours(total_h * 3600), "yes" if p.fits else "NO")
    return summary


def render(p: Plan, console: Optional[Console] = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough that no row wraps
            console = Console(width=160)
    o = p.options
    console.print(f"megaslim dry run{' of ' + p.config if p.config else ''}: {o.nodes} node(s) x {o.gpus_per_node} "
                  f"GPUs ({o.gpu_memory_gib:g} GiB, {o.gpu_tflops:g} TFLOP/s peak, MFU {o.mfu:g}) -> "
                  f"TP {p.tp} x PP {p.pp} x DP {p.dp}")
    console.print(f"shapes from {p.source}")
    for s in p.stages:
        console.print(_stage_table(s, console))
    console.print(_summary_table(p))
    for n in p.notes:
        console.print(f"note: {n}")


def to_json(p: Plan) -> dict:
    # dry_run_only: kept (always null) so plan JSONs keep their keys; every planned architecture now loads
    return {"config": p.config, "source": p.source, "tp": p.tp, "pp": p.pp, "dp": p.dp,
            "dry_run_only": None, "options": dataclasses.asdict(p.options), "notes": p.notes,
            "stages": [{"name": s.name, "params": s.params, "active_params": s.active_params,
                        "flops_per_token": s.flops, "memory_gib": s.memory_gib,
                        "hours": s.hours, "fits": s.fits, "problems": s.problems} for s in p.stages]}


def dry_run(cfg: Config, opts: Optional[PlannerOptions] = None, *, config_path: Optional[str | Path] = None,
            console: Optional[Console] = None, json_path: Optional[str | Path] = None) -> Plan:
    """Plan, print (and write `json_path`), then refuse (PlanError) when a stage does not fit in GPU memory."""
    p = plan(cfg, opts, config_path=config_path)
    render(p, console)
    if json_path:
        mio.write_json(json_path, to_json(p))
    if not p.fits:
        raise PlanError("the plan does not fit: " + " | ".join(p.problems))
    return p


# -- command line --------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """The planner's flags (`--dry-run` selects the planner; the rest are its options)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--config")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="peak per GPU (989: H100 SXM dense bf16)")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--overhead-gib", type=float, default=4.0)
    p.add_argument("--hf-config", help="HF config.json (or its directory) to read shapes from")
    p.add_argument("--json", help="also write the plan as JSON to this file")
    return p


# the flags above that only the planner takes (refused by a real compress run)
FLAGS = ("--nodes", "--gpus-per-node", "--gpu-memory-gib", "--gpu-tflops", "--mfu", "--overhead-gib",
         "--hf-config", "--json")


def wants_dry_run(argv: Sequence[str]) -> bool:
    return parser().parse_known_args(list(argv))[0].dry_run


def _dry_run_argv(argv: Sequence[str]) -> None:
    args, rest = parser().parse_known_args(list(argv))
    cfg = cli.parse_args(__doc__, (["--config", args.config] if args.config else []) + rest)
    opts = PlannerOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib,
                          gpu_tflops=args.gpu_tflops, mfu=args.mfu, overhead_gib=args.overhead_gib,
                          hf_config=args.hf_config)
    dry_run(cfg, opts, config_path=args.config, json_path=args.json)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`launch/compress.py --dry-run ...`. It touches no torch.distributed or megatron state: user errors
    exit 2 with one line, as runtime.main_guard does, without its distributed teardown."""
    try:
        _dry_run_argv(sys.argv[1:] if argv is None else argv)
    except MegaslimError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)

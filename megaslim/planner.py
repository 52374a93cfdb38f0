"""Dry-run planner (`launch/compress.py --config CONFIG --dry-run`): what a compress run costs, before
any GPU, weight or torch.distributed is touched.

Shapes come from `--hf-config PATH` when given, else from `model.load`'s config.json (or a megaslim
checkpoint's metadata) when that path exists, else by convention from `hf_configs/<basename of
model.load>.json` beside the config file or in `configs/recipes/hf_configs/` (the recipes' published
source-model configs; model.load unset: SmolLM2-135M-Instruct.json, the embedded default).

Per stage (the teacher, each round's pruning, each round's distillation) it prints parameters, forward
FLOPs/token and the memory per GPU at the configured TP/PP and DP = nodes * gpus_per_node / (TP * PP),
and refuses layouts that do not divide or do not fit. The formulas (bytes; P_rank = parameters held by
one GPU: TP-sharded linears and vocab-padded embeddings, replicated norms, its pipeline stage only):

  weights           P_rank * w                      w = 2 (bf16/fp16) | 4 (fp32) = model.params_dtype
  gradients         P_rank * 4                      megaslim's DDP reduces grads in fp32
  optimizer (Adam)  P_rank * (12 | 8) / DP          fp32 master copy (absent when w = 4) + 2 moments;
                                                    megatron's distributed optimizer shards it when DP > 1
  teacher           P_rank(teacher) * w             frozen: no gradients, no optimizer state
  activations       per layer and micro-batch, stored for backward (Korthikanti et al. 2022's count,
                    TP without sequence parallelism; megaslim enables neither SP nor recompute):
                      w * s*b * (4h + (2q + 2kv + (m+1)f) / TP)  [+ w * a*s^2*b / TP without flash attention]
                    q = heads*head_dim, kv = groups*head_dim, m = 2 for SwiGLU (gate+up), 1 otherwise.
                    (Megatron's GPT estimate s*b*h*(34 + 5*a*s/h) is the same count for MHA, GeLU with
                    ffn = 4h and dropout masks.) A pipeline stage keeps min(PP - stage, micro-batches)
                    micro-batches in flight (1F1B), each of (layers / PP) layers.
  teacher activations  one layer's working set (forward under no_grad), plus under PP the teacher
                    half of the [student | teacher] tensors each stage keeps per in-flight micro-batch
  KD logits         s*b*V_padded/TP * (2w + 20): student and teacher logits plus ~5 float32
                    vocab-sized temporaries of the KL (last pipeline stage)
  overhead          a flat --overhead-gib (CUDA context, NCCL buffers, allocator fragmentation)

Time = tokens * FLOPs/token / (GPUs * --gpu-tflops * --mfu); distillation FLOPs/token = 3 * F(student)
(forward + backward) + F(teacher) (forward), F = forward FLOPs/token as megaslim.prune.plan.flops_per_token
counts them (attention over the full sequence, logits included); tokens = train_iters * global_batch_size *
seq_length.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from megaslim.config import Config
from megaslim.errors import MegaslimError
from megaslim.model.arch import ModelArch

GIB = 2 ** 30
REPO = Path(__file__).resolve().parents[1]
RECIPE_HF_CONFIGS = REPO / "configs" / "recipes" / "hf_configs"
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(MegaslimError):
    """A layout or target the planner refuses: the message says why and what to change."""


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


# ------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Shape:
    """A ModelArch plus the facts the counts need that older ModelArch versions cannot hold (an ungated
    squared-ReLU MLP and LayerNorm with bias, i.e. Nemotron-4), and whether megaslim can load it."""
    arch: ModelArch
    gated_mlp: bool = True
    norm_bias: bool = False
    unsupported: Optional[str] = None  # why megaslim's HF reader refuses it (None: it loads)

    @property
    def loadable(self) -> bool:
        return self.unsupported is None

    @property
    def hf_heads_rule(self) -> bool:
        """transformers' Llama-family configs require hidden % heads == 0; NemotronConfig does not."""
        return self.arch.family != "nemotron"

    def pruned(self, target: ModelArch) -> "Shape":
        return replace(self, arch=target)


def _described_by_arch(shape: Shape) -> bool:
    """Whether ModelArch itself carries the MLP/norm kind (megaslim builds that load Nemotron)."""
    a = shape.arch
    return (getattr(a, "gated", True) == shape.gated_mlp
            and (getattr(a, "normalization", "RMSNorm") == "LayerNorm1P") == shape.norm_bias)


def _shape_of(arch: ModelArch) -> Shape:
    return Shape(arch, gated_mlp=getattr(arch, "gated", True),
                 norm_bias=getattr(arch, "normalization", "RMSNorm") == "LayerNorm1P")


def shape_from_hf_config(hf: dict) -> Shape:
    """Shape from an HF config.json dict, read by megaslim's own HF reader; a Nemotron config that this
    build's reader refuses is read here for planning only (marked unsupported: dry-run only)."""
    from megaslim.model.hf import arch_from_hf_config

    try:
        arch = arch_from_hf_config(hf)
    except MegaslimError as err:
        if hf.get("model_type") != "nemotron":
            raise
        reason = str(err)
    else:
        return _shape_of(arch)
    heads = hf["num_attention_heads"]
    act = hf.get("hidden_act", "relu2")
    if act not in ("relu2", "squared-relu"):
        raise PlanError(f"nemotron config with hidden_act={act!r}: the planner knows only relu2")
    arch = ModelArch(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf.get("kv_channels") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"], max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rotary_base=float(hf.get("rope_theta", 10000.0)), norm_epsilon=hf.get("norm_eps", 1e-5),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(hf.get("attention_bias", False)), family="nemotron")
    return Shape(arch, gated_mlp=False, norm_bias=True, unsupported=reason)


def _convention_candidates(load: Optional[str], config_path: Optional[Path]) -> list[Path]:
    name = "SmolLM2-135M-Instruct" if load is None else Path(str(load).rstrip("/")).name
    if name.endswith(".gguf"):
        name = name[:-5]
    dirs = ([config_path.resolve().parent / "hf_configs"] if config_path else []) + [RECIPE_HF_CONFIGS]
    seen, out = set(), []
    for d in dirs:
        p = d / f"{name}.json"
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def source_shape(cfg: Config, *, hf_config: Optional[str] = None,
                 config_path: Optional[str | Path] = None) -> tuple[Shape, str]:
    """(shape of model.load, where it came from). Never reads weights."""
    load = cfg.model.load
    if hf_config:
        p = Path(hf_config)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise PlanError(f"--hf-config {hf_config}: no such file")
        return shape_from_hf_config(json.loads(p.read_text())), f"--hf-config {p}"
    if load is not None and Path(load).expanduser().exists():
        path = Path(load).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            return shape_from_hf_config(json.loads((path / "config.json").read_text())), \
                f"model.load {path}/config.json"
        from megaslim import checkpoint as checkpoint_format

        if path.is_dir() and checkpoint_format.is_checkpoint(path):
            return _shape_of(ModelArch.from_dict(checkpoint_format.read_meta(path)["arch"])), \
                f"model.load {path} (megaslim checkpoint metadata)"
        raise PlanError(f"model.load={load}: the dry run reads shapes from an HF directory's config.json or a "
                        "megaslim checkpoint; for anything else (e.g. a .gguf) pass --hf-config PATH")
    candidates = _convention_candidates(load, Path(config_path) if config_path else None)
    for p in candidates:
        if p.is_file():
            why = "model.load unset: the embedded default" if load is None else \
                f"model.load {load} does not exist here; matched by its name"
            return shape_from_hf_config(json.loads(p.read_text())), f"{_rel(p)} ({why})"
    raise PlanError(
        f"model.load={load} does not exist here and no HF config.json was found for it (looked for "
        f"{', '.join(str(_rel(p)) for p in candidates)}); pass --hf-config PATH (an HF config.json or its directory)")


def _rel(p: Path) -> Path:
    try:
        return p.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return p


# ------------------------------------------------------------------------------------------------
# Counts


def num_params(shape: Shape) -> int:
    """Exact parameter count of the HF model: ModelArch.num_params, corrected for an ungated MLP and
    LayerNorm biases when this build's ModelArch cannot describe them."""
    a = shape.arch
    n = a.num_params()
    if _described_by_arch(shape):
        return n
    if not shape.gated_mlp:
        n -= a.num_layers * a.hidden_size * a.ffn_hidden_size  # two MLP matrices, not three
    if shape.norm_bias:
        n += (2 * a.num_layers + 1) * a.hidden_size  # the bias of every LayerNorm
    return n


def embedding_params(shape: Shape) -> int:
    a = shape.arch
    return a.vocab_size * a.hidden_size * (1 if a.tie_word_embeddings else 2)


def flops_per_token(shape: Shape, seq_length: int) -> int:
    """Forward FLOPs per token: 2 x the multiply-adds of every matmul, attention scores and values over the
    full sequence (no causal discount) and the logits; megaslim.prune.plan.flops_per_token for a gated MLP
    (tests/test_planner.py checks they agree)."""
    a = shape.arch
    h, f, hd = a.hidden_size, a.ffn_hidden_size, a.kv_channels
    q, kv = a.num_attention_heads * hd, a.num_query_groups * hd
    mlp = (3 if shape.gated_mlp else 2) * h * f
    per_layer = 2 * (h * (q + 2 * kv) + q * h + mlp) + 2 * 2 * seq_length * q
    return a.num_layers * per_layer + 2 * h * a.vocab_size


def padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)


def _layer_params_rank(shape: Shape, tp: int) -> int:
    a = shape.arch
    h, f, hd = a.hidden_size, a.ffn_hidden_size, a.kv_channels
    q, kv = a.num_attention_heads * hd, a.num_query_groups * hd
    linear = h * (q + 2 * kv) + q * h + (3 if shape.gated_mlp else 2) * h * f
    bias = q + 2 * kv if a.qkv_bias else 0
    norms = 2 * h * (2 if shape.norm_bias else 1) + (2 * hd if a.qk_layernorm else 0)
    return (linear + bias) // tp + norms


def stage_params_rank(shape: Shape, *, tp: int, pp: int, stage: int, divisible_by: int) -> int:
    """Parameters one GPU of pipeline stage `stage` holds (megatron's GPTModel shard)."""
    a = shape.arch
    vp = padded_vocab(a.vocab_size, divisible_by, tp)
    n = (a.num_layers // pp) * _layer_params_rank(shape, tp)
    if stage == 0:
        n += vp * a.hidden_size // tp
    if stage == pp - 1:
        n += a.hidden_size * (2 if shape.norm_bias else 1)
        if not a.tie_word_embeddings or pp > 1:  # tied under PP: the last stage keeps its own copy
            n += vp * a.hidden_size // tp
    return n


def layer_activation_elems(shape: Shape, *, s: int, b: int, tp: int, flash: bool) -> int:
    """Activation elements one transformer layer stores for backward, per GPU (TP without SP)."""
    a = shape.arch
    h, f, hd = a.hidden_size, a.ffn_hidden_size, a.kv_channels
    q, kv = a.num_attention_heads * hd, a.num_query_groups * hd
    m = 2 if shape.gated_mlp else 1
    n = s * b * (4 * h + (2 * q + 2 * kv + (m + 1) * f) // tp)
    if not flash:
        n += a.num_attention_heads * s * s * b // tp
    return n


# ------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Stage:
    name: str
    kind: str  # teacher | prune | distill
    shape: str = ""
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (item, value, how)
    params: Optional[int] = None
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
    dry_run_only: Optional[str]
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
    return (f"{a.num_layers} layers, hidden {a.hidden_size}, ffn {a.ffn_hidden_size}, {a.num_attention_heads} heads "
            f"in {a.num_query_groups} groups x {a.kv_channels}, vocab {a.vocab_size}")


def _layout_problems(shape: Shape, tp: int, pp: int, what: str) -> list[str]:
    from megaslim.model.arch import check_parallel_layout

    try:
        check_parallel_layout(shape.arch, tp, pp)
    except MegaslimError as err:
        return [f"{what}: {err}"]
    return []


def _rounds(cfg: Config, source: Shape, tp: int) -> list[Shape]:
    """The round targets, validated as compress.check does (before anything runs)."""
    from megaslim.prune.plan import target_shape

    if cfg.prune.drop_layers or cfg.prune.plan_path:
        raise PlanError("compress takes its targets from compress.rounds / prune.export_config; "
                        "unset prune.drop_layers and prune.plan_path")
    targets = list(cfg.compress.rounds) or [cfg.prune.export_config]
    out, cur = [], source
    prune_tp = cfg.prune.target_tensor_model_parallel_size or tp
    if cfg.prune.target_params is not None:  # the search's largest candidate bounds the student's size
        from megaslim.prune.search import candidates

        if cfg.compress.rounds:
            raise PlanError("prune.target_params searches one round's shape; unset compress.rounds")
        try:
            return [cur.pruned(candidates(cur.arch, cfg.prune.target_params, cfg.prune.search, tps=(tp, prune_tp),
                                          pp=cfg.prune.target_pipeline_model_parallel_size
                                          or cfg.parallel.pipeline_model_parallel_size)[0])]
        except MegaslimError as err:
            raise PlanError(str(err)) from None
    for i, target in enumerate(targets, 1):
        try:
            # as compress.check, except that transformers' hidden % heads rule is a Llama-family one
            arch = target_shape(cur.arch, target, tp=tp, hf_export=source.hf_heads_rule)
            if prune_tp != tp:
                target_shape(cur.arch, target, tp=prune_tp, hf_export=False)
        except MegaslimError as err:
            raise PlanError(f"compress round {i}: {err}") from None
        cur = cur.pruned(arch)
        out.append(cur)
    return out


def _in_flight(pp: int, stage: int, micro: int) -> int:
    return max(1, min(pp - stage, micro))


def _forward_memory(cfg: Config, shape: Shape, opts: PlannerOptions, *, tp: int, pp: int, s: int, b: int,
                    flash: bool) -> tuple[float, dict]:
    """Peak GPU bytes of a forward-only pass (importance / evaluation): weights + one layer's working set
    + the last stage's logits (bf16 + float32 upcast + log-softmax)."""
    w = _DTYPE_BYTES[cfg.model.params_dtype]
    div = cfg.model.make_vocab_size_divisible_by
    vp = padded_vocab(shape.arch.vocab_size, div, tp)
    worst = (0.0, {})
    for st in range(pp):
        parts = {
            "weights": stage_params_rank(shape, tp=tp, pp=pp, stage=st, divisible_by=div) * w,
            "activations": layer_activation_elems(shape, s=s, b=b, tp=tp, flash=flash) * w
            + (s * b * shape.arch.hidden_size * w if st > 0 else 0),
            "logits": s * b * vp // tp * (w + 8) if st == pp - 1 else 0,
        }
        total = sum(parts.values()) + opts.overhead_gib * GIB
        if total > worst[0]:
            worst = (total, dict(parts, stage=st))
    return worst


def _distill_memory(cfg: Config, student: Shape, teacher: Shape, opts: PlannerOptions, *, tp: int, pp: int,
                    dp: int, micro: int, flash: bool) -> tuple[float, dict]:
    t = cfg.train
    s, b = cfg.data.seq_length, t.micro_batch_size
    w = _DTYPE_BYTES[cfg.model.params_dtype]
    div = cfg.model.make_vocab_size_divisible_by
    vp = padded_vocab(student.arch.vocab_size, div, tp)
    hs, ht = student.arch.hidden_size, teacher.arch.hidden_size
    per_layer = layer_activation_elems(student, s=s, b=b, tp=tp, flash=flash) * w
    teacher_layer = layer_activation_elems(teacher, s=s, b=b, tp=tp, flash=flash) * w
    opt_bytes = 12 if w < 4 else 8
    stages = []
    for st in range(pp):
        p_s = stage_params_rank(student, tp=tp, pp=pp, stage=st, divisible_by=div)
        p_t = stage_params_rank(teacher, tp=tp, pp=pp, stage=st, divisible_by=div)
        fly = _in_flight(pp, st, micro)
        buffers = fly * s * b * ((ht if st > 0 else 0) + (hs + ht if st < pp - 1 else 0)) * w
        parts = {
            "student weights": p_s * w,
            "student grads": p_s * 4,
            "optimizer state": p_s * opt_bytes / (dp if dp > 1 else 1),
            "teacher weights": p_t * w,
            "student activations": fly * (student.arch.num_layers // pp) * per_layer
            + (s * b * 2 * hs * w if st == pp - 1 else 0),
            "teacher activations": teacher_layer + buffers,
            "KD logits": s * b * vp // tp * (2 * w + 20) if st == pp - 1 else 0,
            "overhead": opts.overhead_gib * GIB,
        }
        # for information (megaslim does not expose recompute): each layer keeps only its input, and one
        # layer's full working set exists during its recomputation
        full = fly * (student.arch.num_layers // pp) * s * b * hs * w + per_layer
        stages.append((sum(parts.values()), dict(parts, stage=st, in_flight=fly, params_rank=p_s,
                                                  teacher_params_rank=p_t, **{"full recompute": full})))
    return max(stages, key=lambda x: x[0])


def plan(cfg: Config, opts: Optional[PlannerOptions] = None, *, config_path: Optional[str | Path] = None) -> Plan:
    """Build the dry-run plan of `launch/compress.py` for `cfg`. Raises PlanError for targets or layouts that
    cannot run at all (do not divide); memory that does not fit is reported in `Plan.problems`."""
    opts = opts or PlannerOptions()
    opts.check()
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or opts.world % (tp * pp):
        raise PlanError(f"{opts.nodes} node(s) x {opts.gpus_per_node} GPUs = {opts.world} GPUs do not split into "
                        f"TP {tp} x PP {pp} x DP: the GPU count must be a multiple of TP x PP = {tp * pp}")
    dp = opts.world // (tp * pp)
    source, origin = source_shape(cfg, hf_config=opts.hf_config, config_path=config_path)
    problems = _layout_problems(source, tp, pp, "teacher")
    if problems:
        raise PlanError(problems[0])
    rounds = _rounds(cfg, source, tp)
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise PlanError(f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size"
                        f" x DP = {t.micro_batch_size} x {dp} (DP = {opts.world} GPUs / (TP {tp} x PP {pp}))")
    if t.warmup_iters >= (t.lr_decay_iters or t.train_iters):
        raise PlanError(f"train.warmup_iters={t.warmup_iters} must be smaller than train.lr_decay_iters (or "
                        f"train.train_iters) = {t.lr_decay_iters or t.train_iters}")
    for i, r in enumerate(rounds, 1):
        problems += _layout_problems(r, tp, pp, f"round {i} student")
    if problems:
        raise PlanError("; ".join(problems))

    from megaslim.distill.train import resolve_pairs

    flash = cfg.model.transformer_impl != "local"
    s = cfg.data.seq_length
    world = opts.world
    rate = world * opts.gpu_tflops * 1e12 * opts.mfu  # achieved FLOP/s of the whole job
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    budget = opts.gpu_memory_gib * GIB
    stages: list[Stage] = []

    st = Stage("teacher", "teacher", params=num_params(source), flops=flops_per_token(source, s),
               shape=_shape_str(source.arch))
    st.add("parameters", f"{st.params:,}", f"{_big(st.params)}; embeddings {_big(embedding_params(source))}")
    st.add("FLOPs/token (forward)", _big(st.flops), f"seq_length {s}")
    stages.append(st)

    prev = source
    for i, student in enumerate(rounds, 1):
        # --- pruning (importance on this round's source, then slicing) ---
        ps = Stage(f"round {i} prune", "prune", params=num_params(student), flops=flops_per_token(student, s),
                   shape=_shape_str(student.arch))
        b = cfg.data.micro_batch_size
        total, parts = _forward_memory(cfg, prev, opts, tp=tp, pp=pp, s=s, b=b, flash=flash)
        imp_tokens = cfg.importance.num_samples * s
        passes = imp_tokens * flops_per_token(prev, s)
        if "loss" in cfg.importance.layer_metrics:
            passes += cfg.importance.layer_loss_samples * s * prev.arch.num_layers * flops_per_token(prev, s)
        passes += cfg.eval.num_samples * s * (flops_per_token(prev, s) + flops_per_token(student, s))
        secs = passes / rate
        host = stage_params_rank(prev, tp=1, pp=pp, stage=0, divisible_by=1) * (4 if tp == 1 else
                                                                                _DTYPE_BYTES[cfg.model.params_dtype])
        ps.memory_gib, ps.hours, ps.fits = total / GIB, secs / 3600, total <= budget
        ps.numbers = dict(parts, total=total, seconds=secs)
        ps.add("parameters", f"{num_params(prev):,} -> {ps.params:,}",
               f"{_big(ps.params)} ({100 * ps.params / num_params(prev):.1f}%)" + (
                   "; layers dropped as one contiguous block" if cfg.prune.drop_contiguous
                   and student.arch.num_layers < prev.arch.num_layers else ""))
        ps.add("FLOPs/token (forward)", f"{_big(flops_per_token(prev, s))} -> {_big(ps.flops)}", f"seq_length {s}")
        ps.add("weights / GPU", _gib(parts["weights"]) + " GiB", f"{cfg.model.params_dtype}, TP {tp} PP {pp}")
        ps.add("activations / GPU", _gib(parts["activations"]) + " GiB",
               f"forward only, one layer, data.micro_batch_size {b}")
        ps.add("logits / GPU", _gib(parts["logits"]) + " GiB", "last stage: bf16 + fp32 log-softmax")
        ps.add("peak / GPU", f"{_gib(total)} / {opts.gpu_memory_gib:g} GiB", _fit(total, budget)
               + f", stage {parts['stage']}, +{opts.overhead_gib:g} GiB overhead")
        ps.add("host RAM / process (slicing)", _gib(host) + " GiB",
               f"full stage tensors gathered per rank; x{min(opts.gpus_per_node, world)} per node")
        ps.add("time", _hours(secs), f"{cfg.importance.num_samples} calibration samples"
               + (f" + {cfg.importance.layer_loss_samples} x {prev.arch.num_layers} layer-loss passes"
                  if "loss" in cfg.importance.layer_metrics else "") + " + eval before/after")
        if not ps.fits:
            ps.problems.append(_too_big(total, budget, parts, "importance forward", tp, pp, dp))
        stages.append(ps)

        # --- distillation ---
        teacher = source if cfg.compress.teacher == "original" else prev
        ds = Stage(f"round {i} distill", "distill", params=num_params(student))
        try:
            pairs = resolve_pairs(cfg, student.arch, teacher.arch, pp)
        except MegaslimError as err:
            raise PlanError(f"round {i} distillation: {err}") from None
        f_s, f_t = flops_per_token(student, s), flops_per_token(teacher, s)
        ds.flops = 3 * f_s + f_t
        tokens = t.train_iters * t.global_batch_size * s
        evals = (t.train_iters // cfg.eval.interval if cfg.eval.interval else 0) + 2
        eval_flops = evals * cfg.eval.num_samples * s * f_s + cfg.eval.num_samples * s * f_t
        secs = (tokens * ds.flops + eval_flops) / rate
        total, parts = _distill_memory(cfg, student, teacher, opts, tp=tp, pp=pp, dp=dp, micro=micro, flash=flash)
        ds.memory_gib, ds.hours, ds.fits = total / GIB, secs / 3600, total <= budget
        ds.numbers = dict(parts, total=total, seconds=secs, tokens=tokens, micro_batches=micro)
        w = _DTYPE_BYTES[cfg.model.params_dtype]
        kd = "logit KD" + (f" + intermediate {cfg.distill.intermediate_loss} on {len(pairs)} layer pairs "
                           f"{[list(p) for p in pairs]}" if pairs else " only") + f" ({cfg.distill.kl} KL)"
        ds.add("student / teacher", f"{_big(num_params(student))} / {_big(num_params(teacher))}",
               f"teacher: {'original model' if teacher is source else f'round {i - 1} student'}; {kd}")
        ds.add("layout", f"TP {tp} x PP {pp} x DP {dp} = {world} GPUs",
               f"{micro} micro-batches of {t.micro_batch_size} x {s} tokens per step per DP rank; "
               f"{parts['in_flight']} in flight on stage {parts['stage']}")
        opt_how = f"{12 if w < 4 else 8} B/param" + (f" / DP {dp} (distributed optimizer)" if dp > 1 else "")
        for key, how in (("student weights", f"{parts['params_rank']:,} params/GPU x {w} B"),
                         ("student grads", "x 4 B (fp32 grad buffer)"),
                         ("optimizer state", opt_how),
                         ("teacher weights", f"{parts['teacher_params_rank']:,} params/GPU x {w} B, frozen"),
                         ("student activations", f"{parts['in_flight']} x {student.arch.num_layers // pp} layers x "
                          f"{_gib(layer_activation_elems(student, s=s, b=t.micro_batch_size, tp=tp, flash=flash) * w)}"
                          f" GiB/layer ({'flash' if flash else 'unfused'} attention, no recompute; full "
                          f"recompute would need {_gib(parts['full recompute'])} GiB)"),
                         ("teacher activations", "one layer (no_grad) + PP stage buffers"),
                         ("KD logits", f"s*b*V/TP x {2 * w + 20} B" if parts["stage"] == pp - 1 else "not on this stage"),
                         ("overhead", "CUDA context, NCCL, fragmentation (--overhead-gib)")):
            ds.add(key, _gib(parts[key]) + " GiB", how)
        ds.add("peak / GPU", f"{_gib(total)} / {opts.gpu_memory_gib:g} GiB", _fit(total, budget)
               + f", on pipeline stage {parts['stage']} (PP {pp})")
        ds.add("FLOPs/token (train)", _big(ds.flops), f"3 x {_big(f_s)} (student) + {_big(f_t)} (teacher fwd)")
        ds.add("tokens", f"{tokens:,}", f"{t.train_iters:,} iters x {t.global_batch_size} x {s} "
               f"(= {_big(tokens)}); LR {t.lr:g} -> {t.min_lr:g} cosine, {t.warmup_iters} warmup")
        ds.add("time", _hours(secs), f"{world} GPUs x {opts.gpu_tflops:g} TFLOP/s x MFU {opts.mfu:g}; "
               f"{secs * world / 3600:,.0f} GPU-hours; compute only (no loading/saving)")
        if not ds.fits:
            ds.problems.append(_too_big(total, budget, parts, "distillation", tp, pp, dp))
        stages.append(ds)
        prev = student

    notes = _notes(cfg, source, flash)
    tc = cfg.compress.teacher_correction_iters
    if tc:
        tc_tokens = tc * t.global_batch_size * s
        notes.append(f"teacher correction first: {tc:,} LM-loss steps of the teacher ({_big(tc_tokens)} tokens, "
                     f"~{_hours(tc_tokens * 3 * flops_per_token(source, s) / rate)} compute); its memory is "
                     "that of training a teacher-sized model (not sized here)")
    if cfg.prune.target_params is not None and cfg.prune.search.train_iters:
        se = cfg.prune.search
        se_tokens = se.top_k * se.train_iters * t.global_batch_size * s
        notes.append(f"shape search: {se.top_k} candidates x {se.train_iters} distillation steps "
                     f"({_big(se_tokens)} tokens, ~{_hours(se_tokens * stages[-1].flops / rate)} compute) "
                     "inside the round 1 prune stage")
    return Plan(config=str(config_path) if config_path else None, source=origin, options=opts, tp=tp, pp=pp,
                dp=dp, dry_run_only=source.unsupported, stages=stages, notes=notes)


def _fit(total: float, budget: float) -> str:
    return "fits" if total <= budget else f"DOES NOT FIT (over by {_gib(total - budget)} GiB)"


def _too_big(total: float, budget: float, parts: dict, what: str, tp: int, pp: int, dp: int) -> str:
    items = sorted(((k, v) for k, v in parts.items() if isinstance(v, (int, float)) and k not in
                    ("stage", "in_flight", "params_rank", "teacher_params_rank", "full recompute")),
                   key=lambda kv: -kv[1])
    top = ", ".join(f"{k} {_gib(v)}" for k, v in items[:3])
    return (f"{what} needs {_gib(total)} GiB per GPU on pipeline stage {parts['stage']} at TP {tp} PP {pp} DP {dp}, "
            f"over the {_gib(budget)} GiB of --gpu-memory-gib (largest: {top} GiB); raise TP or PP, lower the "
            "micro-batch size, or add nodes (DP shards the optimizer state)")


def _notes(cfg: Config, source: Shape, flash: bool) -> list[str]:
    notes = []
    if source.unsupported:
        notes.append(f"DRY-RUN ONLY: this build of megaslim cannot load the source architecture "
                     f"({source.unsupported}); a real run stops at its first check. The counts assume an "
                     "ungated squared-ReLU MLP and LayerNorm with bias (Nemotron-4).")
    if not source.hf_heads_rule:
        notes.append(f"{source.arch.family}: transformers' hidden % heads rule (Llama-family configs) is not "
                     "applied to the targets; its HF config carries head_dim.")
    if cfg.prune.target_params is not None:
        notes.append(f"prune.target_params={cfg.prune.target_params:,.0f}: the run ranks the "
                     f"{cfg.prune.search.top_k} shapes nearest the budget after "
                     f"{cfg.prune.search.train_iters} distillation steps each; the plan sizes the largest.")
    if flash:
        notes.append("selective recompute would save nothing here: flash attention (Transformer Engine) keeps no "
                     "s^2 attention scores; full recompute (not exposed by megaslim yet) would keep only each layer's "
                     "input, w*s*b*h per layer (figure in the student activations row).")
    else:
        notes.append("model.transformer_impl=local: unfused attention stores a*s^2*b scores per layer (what "
                     "selective recompute would drop); use transformer_engine/modelopt on GPUs (flash attention).")
    return notes


# ------------------------------------------------------------------------------------------------
# Output


def render(p: Plan, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough that no row wraps
            console = Console(width=160)
    o = p.options
    head = (f"megaslim dry run{' of ' + p.config if p.config else ''}: {o.nodes} node(s) x {o.gpus_per_node} "
            f"GPUs ({o.gpu_memory_gib:g} GiB, {o.gpu_tflops:g} TFLOP/s peak, MFU {o.mfu:g}) -> "
            f"TP {p.tp} x PP {p.pp} x DP {p.dp}")
    console.print(head)
    console.print(f"shapes from {p.source}")
    if p.dry_run_only:
        console.print(f"[bold red]DRY-RUN ONLY[/bold red]: {p.dry_run_only}")
    for s in p.stages:
        title = f"{s.name}: {s.shape}" if s.shape else s.name
        table = Table(title=title, show_header=True, title_justify="left", min_width=min(len(title), console.width))
        table.add_column("item", style="bold")
        table.add_column("value", justify="right")
        table.add_column("how")
        for item, value, how in s.rows:
            table.add_row(item, value, how)
        console.print(table)
    summary = Table(title="summary", title_justify="left")
    for col in ("stage", "params", "FLOPs/token", "peak GiB/GPU", "time", "fits"):
        summary.add_column(col)
    for s in p.stages:
        summary.add_row(s.name, _big(s.params) if s.params else "-", _big(s.flops) if s.flops else "-",
                        f"{s.memory_gib:.1f}" if s.memory_gib is not None else "-",
                        _hours(s.hours * 3600) if s.hours is not None else "-",
                        "-" if s.fits is None else ("yes" if s.fits else "NO"))
    total_h = sum(s.hours or 0 for s in p.stages)
    summary.add_row("total", "", "", "", _hours(total_h * 3600), "yes" if p.fits else "NO")
    console.print(summary)
    for n in p.notes:
        console.print(f"note: {n}")


def dry_run(cfg: Config, opts: Optional[PlannerOptions] = None, *, config_path: Optional[str | Path] = None,
            console=None, json_path: Optional[str | Path] = None) -> Plan:
    """Plan, print (and write `json_path`), then refuse (PlanError) when a stage does not fit in GPU memory."""
    p = plan(cfg, opts, config_path=config_path)
    render(p, console)
    if json_path:
        from megaslim.commands.cli import write_json

        write_json(json_path, to_json(p))
    if not p.fits:
        raise PlanError("the plan does not fit: " + " | ".join(p.problems))
    return p


def to_json(p: Plan) -> dict:
    return {"config": p.config, "source": p.source, "tp": p.tp, "pp": p.pp, "dp": p.dp,
            "dry_run_only": p.dry_run_only, "options": dataclasses.asdict(p.options), "notes": p.notes,
            "stages": [{"name": s.name, "params": s.params, "flops_per_token": s.flops, "memory_gib": s.memory_gib,
                        "hours": s.hours, "fits": s.fits, "problems": s.problems} for s in p.stages]}

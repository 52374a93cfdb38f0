"""One config schema for every megaslim command: dataclasses, YAML files and dotted overrides.

Built on OmegaConf structured configs, so unknown keys and wrong types are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megaslim.errors import MegaslimError


class ConfigError(MegaslimError, ValueError):
    """A user-facing configuration error (bad key, bad type, bad value)."""


@dataclass
class ModelConfig:
    # HF dir | .gguf file | torch_dist checkpoint dir; unset = the embedded SmolLM2-135M-Instruct.
    load: Optional[str] = None
    transformer_impl: str = "local"  # local | transformer_engine | modelopt (TE norms + separate linears)
    params_dtype: str = "float32"  # float32 | bfloat16 | float16
    make_vocab_size_divisible_by: int = 128
    trust_remote_code: bool = False
    tokenizer: Optional[str] = None  # HF tokenizer dir; unset = the one that comes with `load`


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1


@dataclass
class DataConfig:
    train_path: Optional[str] = None
    eval_path: Optional[str] = None
    calib_path: Optional[str] = None
    seq_length: int = 512
    micro_batch_size: int = 4  # rows per forward for evaluation/calibration passes


@dataclass
class ExportConfigShape:
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    num_layers: Optional[int] = None


@dataclass
class ImportanceConfig:
    only: bool = False
    num_samples: int = 1024
    seq_agg: str = "mean"  # mean | l2 | var
    batch_agg: str = "l2"  # mean | l2 | var
    neuron_signal: str = "fc2_input"  # fc2_input | fc1_output
    layer_metrics: list[str] = field(default_factory=lambda: ["bi"])  # bi | loss
    layer_loss_samples: int = 64
    scores_path: Optional[str] = None


@dataclass
class SearchConfig:
    """prune.target_params: candidate shapes within the budget (names as ModelOpt's Minitron search)."""
    max_width_pruning: float = 0.4  # at most this fraction of hidden/ffn/heads is removed per axis
    max_depth_pruning: float = 0.2  # at most this fraction of the layers is removed
    width_step: float = 0.05  # width axes are sampled every width_step of the source size
    hparams_to_skip: list[str] = field(default_factory=list)  # axes kept at the source size
    top_k: int = 5  # candidates nearest the budget that are pruned, briefly distilled and ranked
    train_iters: int = 20  # short distillation per candidate (0 = rank the pruned models as they are)


@dataclass
class SparsityConfig:
    """Unstructured / N:M weight sparsity of the decoder's linear layers (prune.sparsity)."""
    method: Optional[str] = None  # magnitude | wanda; unset = no sparsity
    ratio: float = 0.5  # fraction of weights set to zero (unstructured); 2:4 is always 0.5
    pattern: str = "unstructured"  # unstructured | 2:4


@dataclass
class PruneConfig:
    export_config: ExportConfigShape = field(default_factory=ExportConfigShape)
    drop_layers: list[int] = field(default_factory=list)  # explicit source layers to drop
    layer_metric: str = "bi"  # bi | loss: ranking used for depth pruning without drop_layers
    drop_contiguous: bool = False  # drop the contiguous block with the least total importance
    plan_path: Optional[str] = None  # apply a saved PrunePlan JSON instead of building one
    target_params: Optional[float] = None  # parameter budget: search the shape (prune.search)
    search: SearchConfig = field(default_factory=SearchConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    fold_heads: bool = False
    fold_mode: str = "proj_sum"  # proj_sum (measured best, docs/pruning.md) | laco (parameter-difference)
    iterative: int = 1
    target_tensor_model_parallel_size: Optional[int] = None
    target_pipeline_model_parallel_size: Optional[int] = None


@dataclass
class LoadSpec:
    load: Optional[str] = None


@dataclass
class DistillConfig:
    teacher: LoadSpec = field(default_factory=LoadSpec)
    student: LoadSpec = field(default_factory=LoadSpec)
    kd_loss_scale: float = 1.0
    logit_kl_temperature: float = 1.0
    kl: str = "forward"  # forward | reverse | jsd | topk
    skip_lm_loss: bool = True
    intermediate_layer_pairs: list[Any] = field(default_factory=list)  # [[student_layer, teacher_layer], ...]
    intermediate_loss: str = "cosine"  # cosine | mse | contrastive (InfoNCE over the micro-batch's positions)
    contrastive_temperature: float = 0.1
    jsd_beta: float = 0.5
    top_k: int = 64  # for kl=topk
    fp8: Optional[str] = None  # e4m3 | hybrid (Transformer Engine; docs/fp8.md)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | current | blockwise | mxfp8
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"  # max | most_recent
    fp8_margin: int = 0


@dataclass
class TrainConfig:
    train_iters: int = 100
    exit_interval: Optional[int] = None
    micro_batch_size: int = 4
    global_batch_size: int = 32
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_iters: int = 10
    lr_decay_iters: Optional[int] = None
    clip_grad: float = 1.0
    weight_decay: float = 0.01
    seed: int = 1234


@dataclass
class CheckpointConfig:
    save_interval: Optional[int] = None
    load: Optional[str] = None


@dataclass
class EvalConfig:
    num_samples: int = 64
    interval: Optional[int] = None


@dataclass
class ExportConfig:
    hf_dir: Optional[str] = None


@dataclass
class GenerateConfig:
    """launch/generate.py: synthetic continuations of corpus prompts by the teacher."""
    num_prompts: int = 64
    prompt_length: int = 32  # tokens per corpus window (prompts_path prompts keep their own length)
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 0.95  # nucleus sampling; 1 = off
    batch_size: int = 8
    seed: Optional[int] = None  # default: train.seed
    prompts_path: Optional[str] = None  # own prompts (.jsonl with "text" | .txt); default: corpus windows
    output: Optional[str] = None  # default: <output_dir>/synthetic.jsonl
    kv_cache: bool = True
    stop_at_eos: bool = True


@dataclass
class OfflineConfig:
    """launch/teacher_logits.py: stored top-k teacher log-probs (distill.teacher.load=<store>)."""
    dtype: str = "float32"  # float32 | float16 | bfloat16: storage of the log-probs
    samples_per_shard: int = 256


@dataclass
class CompressConfig:
    # One prune -> distill round per target shape; empty = one round to prune.export_config.
    rounds: list[ExportConfigShape] = field(default_factory=list)
    teacher: str = "original"  # original | previous: which model each round distills from
    teacher_correction_iters: int = 0  # > 0: fine-tune the teacher on the train corpus first (LM loss)
    lm_eval_tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness tasks per family member


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    output_dir: str = "outputs/run"
    resume: bool = False


# Closed vocabularies checked after loading; OmegaConf only checks types.
_CHOICES = {
    "model.transformer_impl": ("local", "transformer_engine", "modelopt"),
    "model.params_dtype": ("float32", "bfloat16", "float16"),
    "importance.seq_agg": ("mean", "l2", "var"),
    "importance.batch_agg": ("mean", "l2", "var"),
    "importance.neuron_signal": ("fc2_input", "fc1_output"),
    "distill.kl": ("forward", "reverse", "jsd", "topk"),
    "prune.layer_metric": ("bi", "loss"),
    "distill.intermediate_loss": ("cosine", "mse", "contrastive"),
    "prune.sparsity.method": (None, "magnitude", "wanda"),
    "prune.sparsity.pattern": ("unstructured", "2:4"),
    "prune.fold_mode": ("proj_sum", "laco"),
    "compress.teacher": ("original", "previous"),
    "distill.fp8": (None, "e4m3", "hybrid"),
    "distill.fp8_recipe": ("delayed", "tensorwise", "current", "blockwise", "mxfp8"),
    "distill.fp8_amax_compute_algo": ("max", "most_recent"),
    "offline.dtype": ("float32", "float16", "bfloat16"),
}
_POSITIVE = (
    "parallel.tensor_model_parallel_size",
    "parallel.pipeline_model_parallel_size",
    "data.seq_length",
    "data.micro_batch_size",
    "importance.num_samples",
    "eval.num_samples",
    "model.make_vocab_size_divisible_by",
)


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _validate(cfg: Config) -> None:
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            hint = " (YAML reads an unquoted 2:4 as the number 124: write '2:4')" if _get(cfg, key) == "124" else ""
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {[c for c in choices if c]}{hint}")
    for key in _POSITIVE:
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {_get(cfg, key)}")
    # Schema keys whose feature has not landed yet: refuse rather than silently ignore them.
    if cfg.checkpoint.load is not None:
        raise ConfigError("checkpoint.load is not used yet: load weights with model.load (or distill.student.load) "
                          "and continue a run in its output_dir with resume=true")
    sp, se = cfg.prune.sparsity, cfg.prune.search
    if not 0.0 < sp.ratio < 1.0:
        raise ConfigError(f"prune.sparsity.ratio={sp.ratio} must be in (0, 1)")
    if sp.pattern == "2:4" and sp.ratio != 0.5:
        raise ConfigError(f"prune.sparsity.pattern=2:4 keeps 2 of every 4 weights (ratio 0.5); got ratio={sp.ratio}")
    if cfg.distill.contrastive_temperature <= 0:
        raise ConfigError(f"distill.contrastive_temperature={cfg.distill.contrastive_temperature} must be > 0")
    if cfg.prune.target_params is not None and cfg.prune.target_params <= 0:
        raise ConfigError(f"prune.target_params={cfg.prune.target_params} must be > 0")
    for key in ("max_width_pruning", "max_depth_pruning"):
        if not 0.0 <= getattr(se, key) < 1.0:
            raise ConfigError(f"prune.search.{key}={getattr(se, key)} must be in [0, 1)")
    if not 0.0 < se.width_step < 1.0:
        raise ConfigError(f"prune.search.width_step={se.width_step} must be in (0, 1)")
    if se.top_k < 1 or se.train_iters < 0:
        raise ConfigError("prune.search.top_k must be >= 1 and prune.search.train_iters >= 0")
    axes = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
    for axis in se.hparams_to_skip:
        if axis not in axes:
            raise ConfigError(f"prune.search.hparams_to_skip: {axis!r} is not one of {list(axes)}")
    if cfg.compress.teacher_correction_iters < 0:
        raise ConfigError("compress.teacher_correction_iters must be >= 0")
    for metric in cfg.importance.layer_metrics:
        if metric not in ("bi", "loss"):
            raise ConfigError(f"importance.layer_metrics: {metric!r} is not one of ['bi', 'loss']")


def _friendly(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return ConfigError(f"unknown config key '{key}'")
    return ConfigError(f"config key '{key}': {msg}" if key else msg)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Schema defaults <- YAML file <- `a.b=c` overrides; returns a validated `Config` dataclass."""
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            merged = OmegaConf.merge(merged, OmegaConf.load(p))
        if overrides:
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override {item!r} is not of the form key.sub=value")
            # YAML 1.1 reads an unquoted N:M (prune.sparsity.pattern=2:4) as a base-60 integer: keep it text
            overrides = [re.sub(r"^([^=]+)=(\d+:\d+)$", r"\1='\2'", item) for item in overrides]
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _friendly(err) from None
    _validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

"""The config schema of every megaslim command: one dataclass per section, Enums for closed vocabularies."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from megaslim.config.choices import (
    Aggregation,
    AmaxAlgo,
    CompressTeacher,
    CoreAttention,
    DType,
    ExpertMetric,
    FoldMode,
    Fp8Mode,
    Fp8Recipe,
    IntermediateLoss,
    KLKind,
    LayerMetric,
    NeuronSignal,
    SearchAxis,
    SparsityMethod,
    SparsityPattern,
    TransformerImpl,
)


@dataclass
class ModelConfig:
    # HF dir | .gguf file | megaslim or Megatron-LM (Bridge) torch_dist checkpoint dir; unset = the embedded
    # SmolLM2-135M-Instruct.
    load: Optional[str] = None
    transformer_impl: TransformerImpl = TransformerImpl.local  # modelopt = TE norms + separate linears
    core_attention: CoreAttention = CoreAttention.sdpa  # transformer_impl=local only (TE/modelopt: TE's kernels)
    params_dtype: DType = DType.float32
    make_vocab_size_divisible_by: int = 128
    trust_remote_code: bool = False
    tokenizer: Optional[str] = None  # HF tokenizer dir; unset = the one that comes with `load`


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1  # MoE: whole experts split over EP of the data-parallel ranks
    # distillation's models: activations outside attention/MLP split over the TP ranks along the sequence
    # (megatron-core trains MoE layers at TP>1 only with it); off at TP=1 (as Megatron-LM), docs/moe.md
    sequence_parallel: bool = False


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
    num_moe_experts: Optional[int] = None  # MoE: routed experts kept per layer (router rows go with them)
    moe_ffn_hidden_size: Optional[int] = None  # MoE: neurons kept in every expert (each its own best)
    moe_shared_expert_intermediate_size: Optional[int] = None  # MoE: neurons kept in the shared expert


@dataclass
class ImportanceConfig:
    only: bool = False
    num_samples: int = 1024
    seq_agg: Aggregation = Aggregation.mean
    batch_agg: Aggregation = Aggregation.l2
    neuron_signal: NeuronSignal = NeuronSignal.fc2_input
    # scores saved with the others: bi (always), loss (one pass per layer), block_loss (for the k of
    # prune.export_config.num_layers); greedy_loss is refused here (prune.layer_metric runs it)
    layer_metrics: list[LayerMetric] = field(default_factory=lambda: [LayerMetric.bi])
    layer_loss_samples: int = 64
    scores_path: Optional[str] = None


@dataclass
class SearchConfig:
    """prune.target_params / target_active_params: candidate shapes within the budget (names as ModelOpt's
    Minitron search)."""
    max_width_pruning: float = 0.4  # at most this fraction of hidden/ffn/heads is removed per axis
    max_depth_pruning: float = 0.2  # at most this fraction of the layers is removed
    width_step: float = 0.05  # width axes are sampled every width_step of the source size
    hparams_to_skip: list[SearchAxis] = field(default_factory=list)  # axes kept at the source size
    top_k: int = 5  # candidates nearest the budget that are pruned, briefly distilled and ranked
    train_iters: int = 20  # short distillation per candidate (0 = rank the pruned models as they are)


@dataclass
class SparsityConfig:
    """Unstructured / N:M weight sparsity of the decoder's linear layers (prune.sparsity)."""
    method: Optional[SparsityMethod] = None  # unset = no sparsity
    ratio: float = 0.5  # fraction of weights set to zero (unstructured); 2:4 is always 0.5
    pattern: SparsityPattern = SparsityPattern.unstructured


@dataclass
class PruneConfig:
    export_config: ExportConfigShape = field(default_factory=ExportConfigShape)
    drop_layers: list[int] = field(default_factory=list)  # explicit source layers to drop
    # depth pruning without drop_layers: bi | loss rank layers alone; block_loss (loss with each contiguous
    # block removed) and greedy_loss (a few layers per round, re-scored) choose jointly (docs/pruning.md)
    layer_metric: LayerMetric = LayerMetric.bi
    drop_contiguous: bool = False  # bi/loss: drop the contiguous block of least total score (block_loss supersedes)
    layer_blocks: int = 1  # layer_metric=block_loss: the dropped layers form at most this many blocks
    plan_path: Optional[str] = None  # apply a saved PrunePlan JSON instead of building one
    target_params: Optional[float] = None  # parameter budget: search the shape (prune.search)
    # or a budget of active parameters (MoE: top-k experts per token; a dense model's active = total, as
    # ModelOpt's active_params): one of the two
    target_active_params: Optional[float] = None
    search: SearchConfig = field(default_factory=SearchConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    fold_heads: bool = False
    fold_mode: FoldMode = FoldMode.proj_sum  # proj_sum (measured best, docs/pruning.md) | laco
    expert_metric: ExpertMetric = ExpertMetric.reap  # MoE: ranks experts for export_config.num_moe_experts
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
    kl: KLKind = KLKind.forward
    skip_lm_loss: bool = True
    intermediate_layer_pairs: list[Any] = field(default_factory=list)  # [[student_layer, teacher_layer], ...]
    intermediate_loss: IntermediateLoss = IntermediateLoss.cosine
    contrastive_temperature: float = 0.1
    jsd_beta: float = 0.5
    top_k: int = 64  # for kl=topk
    # > 0: output layers + logit losses in chunks of this many tokens (megaslim.distill.chunked); 0: whole logits
    logit_chunk_tokens: int = 0
    # MoE student: its router's load-balancing loss coefficient (megatron moe_aux_loss_coeff); unset: the
    # student's own (HF router_aux_loss_coef), 0: off
    moe_aux_loss_coeff: Optional[float] = None
    fp8: Optional[Fp8Mode] = None  # Transformer Engine; docs/fp8.md
    fp8_recipe: Fp8Recipe = Fp8Recipe.delayed
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: AmaxAlgo = AmaxAlgo.max
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


@dataclass
class EvalConfig:
    num_samples: int = 64
    interval: Optional[int] = None


@dataclass
class ExportConfig:
    hf_dir: Optional[str] = None
    # Megatron-LM checkpoint root (iter_NNNNNNN/ + latest_checkpointed_iteration.txt) for pretrain_gpt.py --load
    megatron_dir: Optional[str] = None


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
    dtype: DType = DType.float32  # storage of the log-probs
    samples_per_shard: int = 256


@dataclass
class CompressConfig:
    # One prune -> distill round per target shape; empty = one round to prune.export_config.
    rounds: list[ExportConfigShape] = field(default_factory=list)
    teacher: CompressTeacher = CompressTeacher.original  # which model each round distills from
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

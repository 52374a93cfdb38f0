"""Every check of a config that needs no model, data or world size, so a bad value stops a run first.

`validate(cfg)` holds for every command (load_config runs it; compress runs it on each stage config);
`validate_<command>(cfg)` adds what only that command refuses: a combination the others accept.
Layout checks that need the world size (TP*PP divides it, the global batch splits) are
`megaslim.runtime.ParallelLayout`'s.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from megaslim.config.choice_check import check_choices
from megaslim.config.errors import ConfigError
from megaslim.config.schema import Config

_AT_LEAST_ONE = (
    "parallel.tensor_model_parallel_size",
    "parallel.pipeline_model_parallel_size",
    "parallel.expert_model_parallel_size",
    "data.seq_length",
    "data.micro_batch_size",
    "importance.num_samples",
    "importance.layer_loss_samples",
    "eval.num_samples",
    "model.make_vocab_size_divisible_by",
    "train.train_iters",
    "train.micro_batch_size",
    "train.global_batch_size",
    "prune.iterative",
    "prune.search.top_k",
    "distill.top_k",
    "offline.samples_per_shard",
    "generate.num_prompts",
    "generate.prompt_length",
    "generate.max_new_tokens",
    "generate.batch_size",
)
_AT_LEAST_ONE_WHEN_SET = (
    "prune.target_tensor_model_parallel_size",
    "prune.target_pipeline_model_parallel_size",
    "train.lr_decay_iters",
)
_AT_LEAST_ZERO = (  # intervals: 0 (or unset) = off
    "train.warmup_iters",
    "train.exit_interval",
    "eval.interval",
    "checkpoint.save_interval",
    "prune.search.train_iters",
    "compress.teacher_correction_iters",
    "distill.logit_chunk_tokens",  # 0 = whole logits
)
SHAPE_KEYS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "num_layers",
              "num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")


def search_budget_key(p: Any) -> Optional[str]:
    """The budget key the shape search runs for (prune.target_params | prune.target_active_params; both set
    is refused below), None when the shape is not searched."""
    if p.target_active_params is not None:
        return "prune.target_active_params"
    return "prune.target_params" if p.target_params is not None else None


def _get(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _not_int(v: Any) -> bool:
    return isinstance(v, bool) or not isinstance(v, int)


def _check_counts(cfg: Config) -> None:
    for key in _AT_LEAST_ONE:
        v = _get(cfg, key)
        if v < 1:
            raise ConfigError(f"{key} must be >= 1, got {v}")
    for key in _AT_LEAST_ONE_WHEN_SET:
        v = _get(cfg, key)
        if v is not None and v < 1:
            raise ConfigError(f"{key} must be >= 1 when set, got {v}")
    for key in _AT_LEAST_ZERO:
        v = _get(cfg, key)
        if v is not None and v < 0:
            raise ConfigError(f"{key} must be >= 0, got {v}")


def _check_train(cfg: Config) -> None:
    t = cfg.train
    for key in ("lr", "min_lr", "clip_grad", "weight_decay"):
        if not getattr(t, key) >= 0:  # also NaN
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 0")
    if t.warmup_iters >= (t.lr_decay_iters or t.train_iters):
        raise ConfigError(f"train.warmup_iters={t.warmup_iters} must be smaller than train.lr_decay_iters "
                          f"(or train.train_iters when unset) = {t.lr_decay_iters or t.train_iters}")


def _check_shape(shape: Any, where: str) -> None:
    for k in SHAPE_KEYS:
        v = getattr(shape, k)
        if v is not None and v <= 0:
            raise ConfigError(f"{where}.{k}={v} must be > 0")


def _check_prune_target(cfg: Config) -> None:
    """prune.export_config / drop_layers / compress.rounds: the target values themselves."""
    p = cfg.prune
    _check_shape(p.export_config, "prune.export_config")
    for i, shape in enumerate(cfg.compress.rounds):
        _check_shape(shape, f"compress.rounds[{i}]")
    bad = [i for i in p.drop_layers if i < 0]
    if bad:
        raise ConfigError(f"prune.drop_layers {bad}: layer indices are >= 0 (source layers to drop)")
    budget = search_budget_key(p)
    builds_target = not cfg.importance.only and p.plan_path is None and budget is None
    if builds_target and p.drop_layers and p.export_config.num_layers:
        raise ConfigError("set either prune.drop_layers or prune.export_config.num_layers, not both")
    if p.target_params is not None and p.target_active_params is not None:
        raise ConfigError("set either prune.target_params (all parameters) or prune.target_active_params (those one "
                          "token runs through), not both")
    if budget is not None and _get(cfg, budget) <= 0:
        raise ConfigError(f"{budget}={_get(cfg, budget)} must be > 0")
    depth_by_importance = not p.drop_layers and not p.plan_path and (
        p.export_config.num_layers is not None or budget is not None)
    if (depth_by_importance and not cfg.importance.only and p.layer_metric == "loss"
            and "loss" not in cfg.importance.layer_metrics and not cfg.importance.scores_path):
        raise ConfigError("prune.layer_metric=loss needs importance.layer_metrics to include loss")


def _check_drop_list(cfg: Config) -> None:
    """prune.drop_layers as written: each source layer once (their range needs the model's layer count)."""
    seen = cfg.prune.drop_layers
    twice = sorted({i for i in seen if seen.count(i) > 1})
    if twice:
        raise ConfigError(f"prune.drop_layers lists layer(s) {twice} more than once; list each layer to drop once")


def _check_depth(cfg: Config) -> None:
    """prune.layer_metric=block_loss / greedy_loss, prune.layer_blocks and importance.layer_metrics (the
    counts against the source's layers are megaslim.prune.depth.check_depth_request's)."""
    p, imp = cfg.prune, cfg.importance
    if p.layer_blocks < 1:
        raise ConfigError(f"prune.layer_blocks={p.layer_blocks} must be >= 1")
    if "greedy_loss" in imp.layer_metrics:
        raise ConfigError("importance.layer_metrics: greedy_loss removes layers for one prune target, it is not "
                          "a score of every layer; set prune.layer_metric=greedy_loss")
    joint = p.layer_metric in ("block_loss", "greedy_loss")
    if p.layer_blocks > 1 and p.layer_metric != "block_loss":
        raise ConfigError(f"prune.layer_blocks={p.layer_blocks} sets block_loss's blocks; "
                          f"prune.layer_metric={p.layer_metric} does not use it")
    if not joint and "block_loss" not in imp.layer_metrics:
        return
    what = f"prune.layer_metric={p.layer_metric}" if joint else "importance.layer_metrics: block_loss"
    builds = joint and not imp.only and not p.plan_path
    for bad, why in ((builds and bool(p.drop_layers), "chooses the layers to drop; unset prune.drop_layers"),
                     (builds and p.drop_contiguous, "supersedes prune.drop_contiguous (a block by BI); unset it"),
                     (builds and search_budget_key(p) is not None,
                      f"scores one depth; {search_budget_key(p)} tries several"),
                     (builds and p.iterative > 1, "chooses every layer in one pass; set prune.iterative=1")):
        if bad:
            raise ConfigError(f"{what} {why}")
    computes = not imp.scores_path and not (p.plan_path and not imp.only)
    if computes and p.export_config.num_layers is None and (imp.only or joint):
        raise ConfigError(f"{what} scores removing k layers: set prune.export_config.num_layers")


def target_params_clashes(cfg: Config) -> list[str]:
    """The keys that fix what prune.target_params / target_active_params searches for."""
    p = cfg.prune
    return ([f"prune.export_config.{k}" for k in SHAPE_KEYS if getattr(p.export_config, k) is not None]
            + (["prune.drop_layers"] if p.drop_layers else []) + (["prune.plan_path"] if p.plan_path else [])
            + (["prune.iterative"] if p.iterative != 1 else []))


def _check_target_params(cfg: Config, *, always: bool = False) -> None:
    """prune.target_params (or target_active_params) searches the shape itself, in memory (also refused by
    compress: `always`)."""
    key = search_budget_key(cfg.prune)
    if key is None or (cfg.importance.only and not always):
        return
    clashes = target_params_clashes(cfg)
    if clashes:
        raise ConfigError(f"{key} searches the shape itself; unset {', '.join(clashes)}")
    if cfg.parallel.pipeline_model_parallel_size != 1:
        raise ConfigError(f"{key} prunes every candidate in memory and needs "
                          "parallel.pipeline_model_parallel_size=1 (write the result at any PP with "
                          "prune.target_pipeline_model_parallel_size)")


def _check_iterative(cfg: Config) -> None:
    p = cfg.prune
    if p.iterative <= 1 or cfg.importance.only:
        return
    if p.plan_path:
        raise ConfigError("prune.plan_path fixes the plan; it cannot be combined with prune.iterative > 1")
    if p.drop_layers:
        raise ConfigError("prune.drop_layers lists the layers explicitly, nothing to re-score: use "
                          "prune.export_config.num_layers with prune.iterative > 1, or iterative=1")
    if cfg.parallel.pipeline_model_parallel_size != 1:
        raise ConfigError("prune.iterative > 1 re-scores the partly pruned model in memory and needs "
                          "parallel.pipeline_model_parallel_size=1 (the pruned model can still be written "
                          "at any PP: prune.target_pipeline_model_parallel_size)")


def _check_sparsity_and_search(cfg: Config) -> None:
    sp, se = cfg.prune.sparsity, cfg.prune.search
    if not 0.0 < sp.ratio < 1.0:
        raise ConfigError(f"prune.sparsity.ratio={sp.ratio} must be in (0, 1)")
    if sp.pattern == "2:4" and sp.ratio != 0.5:
        raise ConfigError(f"prune.sparsity.pattern=2:4 keeps 2 of every 4 weights (ratio 0.5); got ratio={sp.ratio}")
    for key in ("max_width_pruning", "max_depth_pruning"):
        if not 0.0 <= getattr(se, key) < 1.0:
            raise ConfigError(f"prune.search.{key}={getattr(se, key)} must be in [0, 1)")
    if not 0.0 < se.width_step < 1.0:
        raise ConfigError(f"prune.search.width_step={se.width_step} must be in (0, 1)")


def _check_layer_pairs(pairs: list) -> None:
    """distill.intermediate_layer_pairs as written: [[student_layer, teacher_layer], ...] of integers
    (their range needs the models: megaslim.distill.losses.intermediate_layer_pairs)."""
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ConfigError(f"distill.intermediate_layer_pairs: {pair!r} is not a [student_layer, "
                              "teacher_layer] pair")
        for who, value in zip(("student", "teacher"), pair):
            if _not_int(value):
                raise ConfigError(f"distill.intermediate_layer_pairs: {who} layer {value!r} is not an integer")
    written = [tuple(p) for p in pairs]
    if len(set(written)) != len(written):
        raise ConfigError(f"distill.intermediate_layer_pairs: duplicate pairs in {[list(p) for p in written]}")


def _check_distill(cfg: Config) -> None:
    d = cfg.distill
    if not d.logit_kl_temperature > 0:
        raise ConfigError(f"distill.logit_kl_temperature={d.logit_kl_temperature} must be > 0")
    if d.contrastive_temperature <= 0:
        raise ConfigError(f"distill.contrastive_temperature={d.contrastive_temperature} must be > 0")
    if d.kl == "jsd" and not 0.0 < d.jsd_beta < 1.0:
        raise ConfigError(f"distill.jsd_beta={d.jsd_beta} must be in (0, 1) for distill.kl=jsd; beta at 0 or 1 "
                          "makes the loss vanish, use distill.kl=forward or reverse instead")
    _check_layer_pairs(list(d.intermediate_layer_pairs))
    if d.moe_aux_loss_coeff is not None and not d.moe_aux_loss_coeff >= 0:
        raise ConfigError(f"distill.moe_aux_loss_coeff={d.moe_aux_loss_coeff} must be >= 0 (0: off; unset: the "
                          "student's own router_aux_loss_coef)")
    if d.fp8 is not None and d.fp8_amax_history_len < 1:
        raise ConfigError(f"distill.fp8_amax_history_len must be >= 1 (got {d.fp8_amax_history_len})")


def _check_sequence_parallel(cfg: Config) -> None:
    """parallel.sequence_parallel splits the sequence over the TP ranks (at TP=1 it is off, as Megatron-LM)."""
    tp, seq = cfg.parallel.tensor_model_parallel_size, cfg.data.seq_length
    if cfg.parallel.sequence_parallel and tp > 1 and seq % tp:
        raise ConfigError(f"parallel.sequence_parallel=true splits data.seq_length={seq} over "
                          f"parallel.tensor_model_parallel_size={tp} ranks: make it a multiple of {tp}")


def _check_generate(cfg: Config) -> None:
    g = cfg.generate
    if not g.temperature >= 0:
        raise ConfigError(f"generate.temperature must be >= 0 (got {g.temperature}); 0 means greedy")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generate.top_p must be in (0, 1] (got {g.top_p})")


def _check_exports(cfg: Config) -> None:
    """export.megatron_dir is a folder of its own: not the run's output_dir nor the HF export."""
    mdir = cfg.export.megatron_dir
    if mdir is None:
        return
    where = os.path.abspath(os.path.expanduser(mdir))
    for key, other in (("output_dir", cfg.output_dir), ("export.hf_dir", cfg.export.hf_dir)):
        if other is not None and os.path.abspath(os.path.expanduser(other)) == where:
            raise ConfigError(f"export.megatron_dir={mdir} is also {key}; give the Megatron-LM checkpoint its own "
                              "folder")


_SECTIONS = (_check_counts, _check_train, _check_prune_target, _check_drop_list, _check_depth, _check_target_params,
             _check_iterative, _check_sparsity_and_search, _check_distill, _check_sequence_parallel, _check_generate,
             _check_exports)


def validate(cfg: Config) -> None:
    """Refuse, with a ConfigError naming the key, any value no command can run with."""
    check_choices(cfg)
    for check in _SECTIONS:
        check(cfg)


# ------------------------------------------------------------------------------------------------------
# per command: combinations one command refuses (the same keys are fine for another)
# ------------------------------------------------------------------------------------------------------
def _check_wanda_spec(cfg: Config) -> None:
    if cfg.prune.sparsity.method == "wanda" and cfg.model.transformer_impl == "transformer_engine":
        raise ConfigError("wanda needs each linear's input, which Transformer Engine's fused norm+linear "
                          "hides (it sees the un-normalized hidden states); use "
                          "model.transformer_impl=modelopt or local")


def _prunes_something(cfg: Config) -> bool:
    p = cfg.prune
    return bool(cfg.importance.only or p.plan_path or p.drop_layers or search_budget_key(p) is not None
                or p.sparsity.method is not None or p.target_tensor_model_parallel_size
                or p.target_pipeline_model_parallel_size
                or any(v is not None for v in vars(p.export_config).values()))


def validate_prune(cfg: Config) -> None:
    """launch/prune.py (and compress's prune stages)."""
    if not _prunes_something(cfg):
        raise ConfigError("nothing to prune: set a target (prune.export_config.*, prune.drop_layers, "
                          "prune.target_params / target_active_params or prune.plan_path), prune.sparsity.method, "
                          "or importance.only=true")
    if cfg.prune.sparsity.method is not None and cfg.importance.only:
        raise ConfigError("prune.sparsity.method is applied after pruning; importance.only=true stops before it")
    _check_wanda_spec(cfg)


def _check_fp8_runs(cfg: Config) -> None:
    if cfg.distill.fp8 is not None:
        problems = _fp8_problems(cfg)
        if problems:
            raise ConfigError(f"distill.fp8={cfg.distill.fp8} cannot run: " + "; ".join(problems))


def _fp8_problems(cfg: Config) -> list[str]:
    """What keeps distill.fp8 from running that the config alone shows (the GPU, TE and the model
    widths are megaslim.distill.fp8's to check)."""
    problems = []
    if cfg.model.transformer_impl != "transformer_engine":
        problems.append(f"distill.fp8 needs the Transformer Engine layer spec: set "
                        f"model.transformer_impl=transformer_engine (got {cfg.model.transformer_impl})")
    align = 32 if cfg.distill.fp8_recipe == "mxfp8" else 16
    tokens = cfg.train.micro_batch_size * cfg.data.seq_length
    if tokens % align:
        problems.append(f"FP8 GEMMs need a multiple of {align} tokens per micro-batch; "
                        f"train.micro_batch_size x data.seq_length = {tokens}")
    return problems


def sequence_parallel_on(cfg: Config) -> bool:
    """parallel.sequence_parallel as it applies: at TP>1 only (runtime's sequence_parallel_applies,
    restated here so the config layer stays free of torch). Only distillation builds its models with it;
    every other command (prune's importance hooks, evaluation) builds them without."""
    return cfg.parallel.sequence_parallel and cfg.parallel.tensor_model_parallel_size > 1


def _check_sequence_parallel_runs(cfg: Config) -> None:
    """What a distillation cannot do under sequence parallelism."""
    chunk = cfg.distill.logit_chunk_tokens
    if sequence_parallel_on(cfg) and chunk > 0:
        raise ConfigError(f"parallel.sequence_parallel=true: distill.logit_chunk_tokens={chunk} chunks the final "
                          "hidden states, which are each TP rank's sequence shard; set distill.logit_chunk_tokens=0")


def validate_distill(cfg: Config) -> None:
    """launch/distill.py (and compress's distillation stages)."""
    p = cfg.prune
    if not cfg.distill.student.load:  # the default student: the teacher pruned by the prune section
        if sequence_parallel_on(cfg):
            raise ConfigError("parallel.sequence_parallel=true needs distill.student.load: the default student "
                              "is pruned now from the teacher's importance, whose hooks read whole sequences "
                              "(prune builds its models without sequence parallelism); run launch/prune.py and "
                              "pass its checkpoint, or launch/compress.py")
        if p.sparsity.method:
            raise ConfigError("prune.sparsity is applied by launch/prune.py; run it and pass "
                              "distill.student.load=<its checkpoint> (the masks travel in the checkpoint)")
        if not p.plan_path and p.iterative != 1:
            raise ConfigError("the default student of distill.py is pruned in one shot; run launch/prune.py "
                              "with prune.iterative and pass distill.student.load=<its checkpoint>")
    _check_fp8_runs(cfg)
    _check_sequence_parallel_runs(cfg)


def validate_generate(cfg: Config) -> None:
    """launch/generate.py."""
    pp = cfg.parallel.pipeline_model_parallel_size
    if pp != 1:
        raise ConfigError(f"generation runs at parallel.pipeline_model_parallel_size=1 (got {pp}); "
                          "shard a large teacher with tensor parallelism instead")


def validate_compress(cfg: Config) -> None:
    """launch/compress.py, before any stage: its targets, and what its stages would refuse later."""
    p = cfg.prune
    key = search_budget_key(p)
    if key is not None and cfg.compress.rounds:
        raise ConfigError(f"{key} searches one round's shape; unset compress.rounds (or give "
                          f"every round its shape and unset {key})")
    _check_target_params(cfg, always=True)
    if p.drop_layers or p.plan_path:
        raise ConfigError("compress takes its targets from compress.rounds / prune.export_config; "
                          "unset prune.drop_layers and prune.plan_path")
    _check_fp8_runs(cfg)  # every distillation stage
    _check_sequence_parallel_runs(cfg)
    _check_wanda_spec(cfg)  # every prune stage

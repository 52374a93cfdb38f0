"""One test per config check: a bad value is a ConfigError naming the key, before any model is loaded."""
import pytest

from megaslim.config import (
    Config,
    ConfigError,
    ExportConfigShape,
    load_config,
    validate,
    validate_compress,
    validate_distill,
    validate_generate,
    validate_prune,
)


def _refused(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value), str(err.value)


@pytest.mark.parametrize("key", [
    "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size", "data.seq_length",
    "data.micro_batch_size", "importance.num_samples", "importance.layer_loss_samples", "eval.num_samples",
    "model.make_vocab_size_divisible_by", "train.train_iters", "train.micro_batch_size", "train.global_batch_size",
    "prune.iterative", "prune.search.top_k", "distill.top_k", "offline.samples_per_shard", "generate.num_prompts",
    "generate.prompt_length", "generate.max_new_tokens", "generate.batch_size",
])
def test_counts_must_be_at_least_one(key):
    _refused([f"{key}=0"], f"{key} must be >= 1, got 0")


@pytest.mark.parametrize("key", [
    "prune.target_tensor_model_parallel_size", "prune.target_pipeline_model_parallel_size", "train.lr_decay_iters",
])
def test_optional_counts_must_be_at_least_one_when_set(key):
    _refused([f"{key}=0"], f"{key} must be >= 1 when set, got 0")
    load_config(None, [f"{key}=null"])


@pytest.mark.parametrize("key", [
    "train.warmup_iters", "train.exit_interval", "eval.interval", "checkpoint.save_interval",
    "prune.search.train_iters", "compress.teacher_correction_iters",
])
def test_intervals_and_iterations_must_not_be_negative(key):
    _refused([f"{key}=-1"], f"{key} must be >= 0, got -1")


def test_warmup_shorter_than_the_decay():
    _refused(["train.train_iters=10", "train.warmup_iters=10"], "train.warmup_iters=10 must be smaller than")
    _refused(["train.lr_decay_iters=5", "train.warmup_iters=5"], "train.lr_decay_iters")
    load_config(None, ["train.train_iters=10", "train.warmup_iters=9"])
    load_config(None, ["train.train_iters=1", "train.warmup_iters=0"])


@pytest.mark.parametrize("key", ["hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                                 "num_layers"])
def test_export_config_values_must_be_positive(key):
    _refused([f"prune.export_config.{key}=0"], f"prune.export_config.{key}=0 must be > 0")
    _refused([f"compress.rounds=[{{{key}: -2}}]"], f"compress.rounds[0].{key}=-2 must be > 0")


def test_drop_layers_non_negative_and_not_with_num_layers():
    _refused(["prune.drop_layers=[1,-1]"], "prune.drop_layers [-1]")
    _refused(["prune.drop_layers=[1]", "prune.export_config.num_layers=3"],
             "set either prune.drop_layers or prune.export_config.num_layers, not both")
    # a saved plan or a scoring-only run does not build the target from them
    load_config(None, ["prune.drop_layers=[1]", "prune.export_config.num_layers=3", "importance.only=true"])
    load_config(None, ["prune.drop_layers=[1]", "prune.export_config.num_layers=3", "prune.plan_path=/p.json"])


def test_layer_metric_loss_needs_the_loss_scores():
    _refused(["prune.layer_metric=loss", "prune.export_config.num_layers=3"],
             "prune.layer_metric=loss needs importance.layer_metrics to include loss")
    load_config(None, ["prune.layer_metric=loss", "prune.export_config.num_layers=3",
                       "importance.layer_metrics=[bi,loss]"])
    load_config(None, ["prune.layer_metric=loss", "prune.export_config.num_layers=3", "importance.scores_path=/s"])
    load_config(None, ["prune.layer_metric=loss", "prune.drop_layers=[0]"])  # explicit layers: no ranking


def test_target_params_searches_the_shape_itself():
    _refused(["prune.target_params=1e6", "prune.export_config.hidden_size=48"],
             "prune.target_params searches the shape itself; unset prune.export_config.hidden_size")
    _refused(["prune.target_params=1e6", "prune.drop_layers=[0]", "prune.plan_path=/p", "prune.iterative=2"],
             "unset prune.drop_layers, prune.plan_path, prune.iterative")
    _refused(["prune.target_params=1e6", "parallel.pipeline_model_parallel_size=2"],
             "needs parallel.pipeline_model_parallel_size=1")
    _refused(["prune.target_params=0"], "prune.target_params=0.0 must be > 0")
    load_config(None, ["prune.target_params=1e6", "prune.export_config.hidden_size=48", "importance.only=true"])


@pytest.mark.parametrize("extra, needle", [
    (["prune.plan_path=/p.json"], "prune.plan_path fixes the plan"),
    (["prune.drop_layers=[0]"], "prune.drop_layers lists the layers explicitly"),
    (["parallel.pipeline_model_parallel_size=2"], "prune.iterative > 1 re-scores the partly pruned model"),
])
def test_iterative_pruning_combinations(extra, needle):
    _refused(["prune.iterative=2", *extra], needle)
    load_config(None, ["prune.iterative=2", *extra, "importance.only=true"])


@pytest.mark.parametrize("overrides, needle", [
    (["prune.sparsity.ratio=1.0"], "prune.sparsity.ratio=1.0 must be in (0, 1)"),
    (["prune.sparsity.ratio=0"], "prune.sparsity.ratio"),
    (["prune.sparsity.pattern=2:4", "prune.sparsity.ratio=0.6"], "prune.sparsity.pattern=2:4 keeps 2 of every 4"),
    (["prune.search.max_width_pruning=1.0"], "prune.search.max_width_pruning=1.0 must be in [0, 1)"),
    (["prune.search.max_depth_pruning=-0.1"], "prune.search.max_depth_pruning=-0.1"),
    (["prune.search.width_step=0"], "prune.search.width_step=0.0 must be in (0, 1)"),
    (["prune.search.hparams_to_skip=[vocab]"], "prune.search.hparams_to_skip: 'vocab' is not one of"),
])
def test_sparsity_and_search_ranges(overrides, needle):
    _refused(overrides, needle)


@pytest.mark.parametrize("overrides, needle", [
    (["distill.logit_kl_temperature=0"], "distill.logit_kl_temperature=0.0 must be > 0"),
    (["distill.contrastive_temperature=0"], "distill.contrastive_temperature=0.0 must be > 0"),
    (["distill.kl=jsd", "distill.jsd_beta=1.0"], "distill.jsd_beta=1.0 must be in (0, 1)"),
    (["distill.kl=topk", "distill.top_k=0"], "distill.top_k must be >= 1"),
    (["distill.fp8=e4m3", "distill.fp8_amax_history_len=0"], "distill.fp8_amax_history_len must be >= 1"),
    # were megaslim.distill.fp8.fp8_problems' (tests/test_fp8.py): the settings are the config's
    (["distill.fp8=e5m2"], "distill.fp8='e5m2' is not one of ['e4m3', 'hybrid']"),
    (["distill.fp8=hybrid", "distill.fp8_recipe=fp4"], "distill.fp8_recipe='fp4' is not one of"),
    (["distill.fp8=hybrid", "distill.fp8_amax_compute_algo=mean"],
     "distill.fp8_amax_compute_algo='mean' is not one of"),
])
def test_distill_values(overrides, needle):
    _refused(overrides, needle)


def test_jsd_beta_only_matters_for_jsd():
    load_config(None, ["distill.jsd_beta=1.0"])


@pytest.mark.parametrize("pairs, needle", [
    ("[[0,1,2]]", "distill.intermediate_layer_pairs: [0, 1, 2] is not a [student_layer, teacher_layer] pair"),
    ("[3]", "distill.intermediate_layer_pairs: 3 is not a [student_layer, teacher_layer] pair"),
    ("['0-1']", "is not a [student_layer, teacher_layer] pair"),
    ("[[0,'x']]", "distill.intermediate_layer_pairs: teacher layer 'x' is not an integer"),
    ("[[0.5,1]]", "distill.intermediate_layer_pairs: student layer 0.5 is not an integer"),
    ("[[0,1],[0,1]]", "distill.intermediate_layer_pairs: duplicate pairs"),
])
def test_intermediate_layer_pairs_shape(pairs, needle):
    _refused([f"distill.intermediate_layer_pairs={pairs}"], needle)


def test_intermediate_layer_pairs_ok_from_overrides_and_yaml(tmp_path):
    assert load_config(None, ["distill.intermediate_layer_pairs=[[0,1],[-1,-1]]"]).distill.intermediate_layer_pairs \
        == [[0, 1], [-1, -1]]
    (tmp_path / "c.yaml").write_text("distill:\n  intermediate_layer_pairs:\n  - [2, 5]\n  - [3, 7]\n")
    assert load_config(tmp_path / "c.yaml").distill.intermediate_layer_pairs == [[2, 5], [3, 7]]


@pytest.mark.parametrize("overrides, needle", [
    (["generate.temperature=-0.1"], "generate.temperature must be >= 0"),
    (["generate.top_p=0"], "generate.top_p must be in (0, 1]"),
    (["generate.top_p=1.5"], "generate.top_p must be in (0, 1]"),
])
def test_generate_values(overrides, needle):
    _refused(overrides, needle)


# ----------------------------------------------------------------------------------------- per command
def _cfg(*overrides):
    return load_config(None, list(overrides))


def _command_refuses(check, overrides, needle):
    cfg = _cfg(*overrides)  # every command but this one accepts it
    with pytest.raises(ConfigError) as err:
        check(cfg)
    assert needle in str(err.value), str(err.value)


def test_prune_command_combinations():
    _command_refuses(validate_prune, ["prune.sparsity.method=magnitude", "importance.only=true"],
                     "prune.sparsity.method is applied after pruning; importance.only=true stops before it")
    _command_refuses(validate_prune, ["prune.sparsity.method=wanda", "model.transformer_impl=transformer_engine"],
                     "wanda needs each linear's input")
    validate_prune(_cfg("prune.sparsity.method=magnitude", "model.transformer_impl=transformer_engine"))


def test_distill_command_default_student():
    _command_refuses(validate_distill, ["prune.sparsity.method=magnitude"],
                     "prune.sparsity is applied by launch/prune.py")
    _command_refuses(validate_distill, ["prune.iterative=2"], "the default student of distill.py is pruned in one shot")
    validate_distill(_cfg("prune.sparsity.method=magnitude", "prune.iterative=2", "distill.student.load=/s"))
    validate_distill(_cfg("prune.iterative=2", "prune.plan_path=/p.json", "importance.only=true"))


def test_distill_command_fp8_needs_te_and_aligned_tokens():
    _command_refuses(validate_distill, ["distill.fp8=e4m3"],
                     "distill.fp8=e4m3 cannot run: distill.fp8 needs the Transformer Engine layer spec")
    te = "model.transformer_impl=transformer_engine"
    _command_refuses(validate_distill, ["distill.fp8=hybrid", te, "data.seq_length=10", "train.micro_batch_size=1"],
                     "FP8 GEMMs need a multiple of 16 tokens per micro-batch")
    _command_refuses(validate_distill, ["distill.fp8=hybrid", "distill.fp8_recipe=mxfp8", te, "data.seq_length=16",
                                        "train.micro_batch_size=1"], "multiple of 32 tokens")
    validate_distill(_cfg("distill.fp8=hybrid", te, "data.seq_length=32", "distill.student.load=/s"))


def test_generate_command_needs_pp1():
    _command_refuses(validate_generate, ["parallel.pipeline_model_parallel_size=2"],
                     "generation runs at parallel.pipeline_model_parallel_size=1 (got 2)")
    validate_generate(_cfg())


@pytest.mark.parametrize("overrides, needle", [
    (["prune.target_params=1e6", "compress.rounds=[{hidden_size: 48}]"], "unset compress.rounds"),
    (["prune.target_params=1e6", "prune.export_config.hidden_size=48", "importance.only=true"],
     "unset prune.export_config.hidden_size"),
    (["prune.drop_layers=[0]"], "compress takes its targets from compress.rounds / prune.export_config"),
    (["prune.plan_path=/p.json"], "unset prune.drop_layers and prune.plan_path"),
    (["distill.fp8=e4m3"], "distill.fp8=e4m3 cannot run"),
    (["prune.sparsity.method=wanda", "model.transformer_impl=transformer_engine"], "wanda needs each linear's input"),
])
def test_compress_command(overrides, needle):
    _command_refuses(validate_compress, overrides, needle)


def test_compress_stage_configs_are_validated_like_loaded_ones():
    """compress changes its stage configs in code; `validate` refuses what load_config would."""
    cfg = _cfg("compress.rounds=[{hidden_size: 48}]")
    validate_compress(cfg)
    cfg.train.train_iters, cfg.train.warmup_iters = 3, 0
    validate(cfg)
    cfg.prune.export_config = ExportConfigShape(hidden_size=0)
    with pytest.raises(ConfigError, match=r"prune\.export_config\.hidden_size=0 must be > 0"):
        validate(cfg)
    stage = Config()
    stage.train.warmup_iters = stage.train.train_iters
    with pytest.raises(ConfigError, match=r"train\.warmup_iters"):
        validate(stage)


# ------------------------------------------------------------------------------------ issue 17 additions
@pytest.mark.parametrize("key", ["lr", "min_lr", "clip_grad", "weight_decay"])
def test_train_rates_not_negative(key):
    _refused([f"train.{key}=-1"], f"train.{key}=-1.0 must be >= 0")


def test_drop_layers_each_once():
    _refused(["prune.drop_layers=[2,1,2]"], "prune.drop_layers lists layer(s) [2] more than once")


def test_prune_needs_a_target():
    _command_refuses(validate_prune, [], "nothing to prune")
    for ok in ("prune.drop_layers=[0]", "prune.export_config.hidden_size=48", "prune.plan_path=/p.json",
               "importance.only=true", "prune.sparsity.method=magnitude", "prune.target_params=1e6",
               "prune.target_tensor_model_parallel_size=2"):
        validate_prune(_cfg(ok))


def test_malformed_yaml_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text("model: [unclosed\n  load: x\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML \(line 2, column 7\)"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "l.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of config sections"):
        load_config(tmp_path / "l.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_output_dir_checks(tmp_path):
    from megaslim.config import check_output_dir_writable, check_output_file_writable

    (tmp_path / "f").write_text("x")
    check_output_dir_writable(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    with pytest.raises(ConfigError, match="output_dir=.*/f is a file"):
        check_output_dir_writable(tmp_path / "f")
    with pytest.raises(ConfigError, match="has a file on its way"):
        check_output_dir_writable(tmp_path / "f" / "sub")
    with pytest.raises(ConfigError, match="generate.output=.* is a directory"):
        check_output_file_writable(tmp_path, "generate.output")
    with pytest.raises(ConfigError, match="cannot write in /proc"):
        check_output_dir_writable("/proc/megaslim_out")

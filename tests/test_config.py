import pytest

from megaslim.config import ConfigError, load_config


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("parallel:\n  tensor_model_parallel_size: 2\ndata:\n  seq_length: 128\n")
    cfg = load_config(f, ["data.seq_length=64", "prune.export_config.hidden_size=448"])
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.data.seq_length == 64  # the command line wins over the file
    assert cfg.prune.export_config.hidden_size == 448
    assert cfg.importance.batch_agg == "l2" and cfg.importance.seq_agg == "mean"


@pytest.mark.parametrize("override, needle", [
    (["parallel.tensor_parallel=2"], "parallel.tensor_parallel"),
    (["nosuchsection.x=1"], "nosuchsection"),
    (["parallel.tensor_model_parallel_size=two"], "parallel.tensor_model_parallel_size"),
    (["importance.seq_agg=max"], "importance.seq_agg"),
    (["data.seq_length=0"], "data.seq_length"),
    (["importance.layer_metrics=[bi,foo]"], "foo"),
    (["model.transformer_impl=apex"], "model.transformer_impl"),
])
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, override)


def test_unknown_key_in_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_config(f)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert files, "configs/ should ship presets"
    for f in files:
        load_config(f)


def test_checkpoint_load_is_not_a_key():
    """Dropped from the schema (resume=true and model.load / distill.*.load cover it): refused as unknown."""
    with pytest.raises(ConfigError, match=r"unknown config key 'checkpoint\.load'"):
        load_config(None, ["checkpoint.load=/x"])


@pytest.mark.parametrize("override, needle", [
    (["prune.sparsity.ratio=1.0"], "prune.sparsity.ratio"),
    (["prune.sparsity.ratio=0"], "prune.sparsity.ratio"),
    (["prune.sparsity.pattern=2:4", "prune.sparsity.ratio=0.6"], "2:4"),
    (["prune.sparsity.method=sparsegpt"], "prune.sparsity.method"),
    (["prune.target_params=-1"], "prune.target_params"),
    (["prune.search.max_width_pruning=1.0"], "max_width_pruning"),
    (["prune.search.hparams_to_skip=[vocab]"], "hparams_to_skip"),
    (["distill.contrastive_temperature=0"], "contrastive_temperature"),
])
def test_new_section_values_are_checked(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, override)


def test_two_four_pattern_reads_as_text_from_overrides_and_files(tmp_path):
    assert load_config(None, ["prune.sparsity.pattern=2:4"]).prune.sparsity.pattern == "2:4"
    f = tmp_path / "c.yaml"
    f.write_text("prune:\n  sparsity:\n    pattern: 2:4\n")
    with pytest.raises(ConfigError, match="write '2:4'"):
        load_config(f)
    f.write_text("prune:\n  sparsity:\n    pattern: '2:4'\n")
    assert load_config(f).prune.sparsity.pattern == "2:4"

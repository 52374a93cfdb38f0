"""The config's Enum fields: loaded by value, refused with the values listed, behaving as plain strings."""
import copy
import dataclasses
import json
import pickle
from enum import Enum

import omegaconf
import pytest
from omegaconf import OmegaConf
from omegaconf.nodes import EnumNode

from megaslim.config import (
    Choice,
    Config,
    ConfigError,
    DType,
    Fp8Recipe,
    KLKind,
    LayerMetric,
    ModelConfig,
    SparsityPattern,
    load_config,
    to_dict,
    to_yaml,
    validate,
)

OVERRIDES = ["prune.sparsity.pattern=2:4", "prune.sparsity.method=wanda", "distill.kl=topk", "distill.fp8=hybrid",
             "importance.layer_metrics=[bi,loss]", "prune.search.hparams_to_skip=[num_layers]",
             "model.params_dtype=bfloat16"]


def test_omegaconf_is_the_release_that_matches_values():
    assert omegaconf.__version__ == "2.4.0"  # pinned in pyproject.toml: 2.3 matches member names only
    convert = EnumNode.validate_and_convert_to_enum
    assert convert(SparsityPattern, "2:4") is convert(SparsityPattern, "two_four") is SparsityPattern.two_four
    node = OmegaConf.merge(OmegaConf.structured(Config), {"prune": {"sparsity": {"pattern": "2:4"}}})
    assert node.prune.sparsity.pattern is SparsityPattern.two_four


def test_fields_load_as_members():
    cfg = load_config(None, OVERRIDES)
    assert cfg.prune.sparsity.pattern is SparsityPattern.two_four
    assert cfg.distill.kl is KLKind.topk and cfg.model.params_dtype is DType.bfloat16
    assert cfg.importance.layer_metrics == [LayerMetric.bi, LayerMetric.loss]
    assert cfg.distill.fp8 == "hybrid" and load_config().distill.fp8 is None  # Optional stays None
    assert load_config().prune.sparsity.method is None


def test_members_behave_as_their_values():
    p, k = SparsityPattern.two_four, KLKind.forward
    assert p == "2:4" and k == "forward" and k != "reverse" and k in ("forward", "reverse")
    assert str(p) == "2:4" and f"{p}" == "2:4" and f"[{p:>5}]" == "[  2:4]" and repr(p) == "'2:4'"
    assert "x" + p == "x2:4" and "%s" % p == "2:4"
    assert hash(p) == hash("2:4") and {"2:4": 1}[p] == 1 and {p: 2}["2:4"] == 2 and "2:4" in {p}
    assert {"forward": 1, "topk": 2}[k] == 1
    assert json.dumps({"pattern": p, p: 1}) == '{"pattern": "2:4", "2:4": 1}'
    assert pickle.loads(pickle.dumps(p)) is p and copy.deepcopy(p) is p
    assert isinstance(p, str) and isinstance(p, Choice) and issubclass(SparsityPattern, Enum)


def test_bad_values_list_the_values_not_the_member_names():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["distill.kl=bad"])
    assert str(err.value) == "distill.kl='bad' is not one of ['forward', 'reverse', 'jsd', 'topk']"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["prune.sparsity.pattern=3:4"])
    assert str(err.value) == "prune.sparsity.pattern='3:4' is not one of ['unstructured', '2:4']"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["prune.sparsity.method=sparsegpt"])
    assert str(err.value) == "prune.sparsity.method='sparsegpt' is not one of ['magnitude', 'wanda']"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["importance.layer_metrics=[bi,foo]"])
    assert str(err.value) == "importance.layer_metrics: 'foo' is not one of ['bi', 'loss', 'block_loss', 'greedy_loss']"


@pytest.mark.parametrize("key, bad", [
    ("model.transformer_impl", "apex"), ("model.params_dtype", "fp8"), ("importance.seq_agg", "max"),
    ("importance.batch_agg", "max"), ("importance.neuron_signal", "fc1_input"), ("prune.layer_metric", "taylor"),
    ("prune.fold_mode", "sum"), ("distill.intermediate_loss", "kl"), ("distill.fp8", "e5m2"),
    ("distill.fp8_recipe", "block"), ("distill.fp8_amax_compute_algo", "min"), ("offline.dtype", "int8"),
    ("compress.teacher", "best"),
])
def test_every_choice_field_refuses_an_unknown_value(key, bad):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', r'[.]')}='{bad}' is not one of \["):
        load_config(None, [f"{key}={bad}"])


def test_documented_alias_current_is_kept():
    cfg = load_config(None, ["distill.fp8=e4m3", "distill.fp8_recipe=current"])
    assert cfg.distill.fp8_recipe == "current" and cfg.distill.fp8_recipe is Fp8Recipe.current


def test_dict_json_and_yaml_hold_plain_strings(tmp_path):
    cfg = load_config(None, OVERRIDES)
    data = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert data["prune"]["sparsity"]["pattern"] == "2:4" and data["importance"]["layer_metrics"] == ["bi", "loss"]
    plain = to_dict(cfg)
    assert type(plain["distill"]["kl"]) is str and type(plain["importance"]["layer_metrics"][1]) is str
    text = to_yaml(cfg)
    assert "pattern: '2:4'" in text and "two_four" not in text and "SparsityPattern" not in text
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml") == cfg  # the saved run config reads back the same


def test_structured_round_trip():
    cfg = load_config(None, OVERRIDES)
    again = OmegaConf.to_object(OmegaConf.structured(cfg))
    assert again == cfg and again.prune.sparsity.pattern is SparsityPattern.two_four


def test_configs_built_in_code_are_checked_by_value():
    """Configs made or changed in code (compress's stages) go through `validate` with plain strings."""
    cfg = Config(model=ModelConfig(params_dtype="bfloat16"))
    validate(cfg)
    cfg.distill.kl = "reverse"
    validate(cfg)
    cfg.distill.kl = "bad"
    with pytest.raises(ConfigError, match=r"distill\.kl='bad' is not one of"):
        validate(cfg)
    cfg.distill.kl = "forward"
    cfg.importance.layer_metrics = ["bi", "nope"]
    with pytest.raises(ConfigError, match=r"importance\.layer_metrics: 'nope'"):
        validate(cfg)

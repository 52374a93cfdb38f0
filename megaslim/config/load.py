"""Loading a config: schema defaults <- YAML file <- `a.b=c` overrides, then `validate`; and writing it back.

Built on OmegaConf structured configs, so unknown keys and wrong types are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import re
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megaslim.config.choice_check import choice_message, field_choice
from megaslim.config.errors import ConfigError
from megaslim.config.schema import Config
from megaslim.config.validate import validate


def _friendly(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return ConfigError(f"unknown config key '{key}'")
    choice = field_choice(Config, key) if key else None
    if choice is not None:  # OmegaConf lists member names; the values are what users write
        kind, in_list = choice
        return ConfigError(choice_message(re.sub(r"\[\d+\]$", "", key), getattr(err, "value", None), kind,
                                          in_list=in_list))
    return ConfigError(f"config key '{key}': {msg}" if key else msg)


def _read_yaml(p: Path):
    """The YAML file `p` as an OmegaConf node; a missing, unreadable or malformed file in one line."""
    if p.is_dir():
        raise ConfigError(f"--config {p} is a directory; give a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        node = OmegaConf.load(p)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--config {p}: not valid YAML{where}: {what}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {p}: not UTF-8 text; give a YAML file") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"--config {p}: expected a mapping of config sections (model:, data:, ...), "
                          f"got a {type(node).__name__}")
    return node


def _merged(path: Optional[str | Path], overrides: Optional[list[str]]):
    merged = OmegaConf.structured(Config)
    if path is not None:
        p = Path(path)
        merged = OmegaConf.merge(merged, _read_yaml(p))
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        # YAML 1.1 reads an unquoted N:M (prune.sparsity.pattern=2:4) as a base-60 integer: keep it text
        overrides = [re.sub(r"^([^=]+)=(\d+:\d+)$", r"\1='\2'", item) for item in overrides]
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    return merged


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Schema defaults <- YAML file <- `a.b=c` overrides; returns a validated `Config` dataclass."""
    try:
        cfg = OmegaConf.to_object(_merged(path, overrides))
    except OmegaConfBaseException as err:
        raise _friendly(err) from None
    validate(cfg)
    return cfg


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Config) -> dict:
    """The config as plain data (Enum members as their string values)."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: _plain(v) for k, v in items})


def to_yaml(cfg: Config) -> str:
    """YAML that load_config reads back to the same config (values such as '2:4' quoted)."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))

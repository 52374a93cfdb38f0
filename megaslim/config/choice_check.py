"""Enum fields checked by value: one message, listing the allowed values, for OmegaConf and for validate."""
from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from typing import Any, Optional

from megaslim.config.choices import Choice
from megaslim.config.errors import ConfigError

_YAML_124 = " (YAML reads an unquoted 2:4 as the number 124: write '2:4')"


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap(kind: Any) -> tuple[Any, bool, bool]:
    """(the type inside Optional[...] / list[...], whether it was a list, whether None is allowed)."""
    origin = typing.get_origin(kind)
    optional = origin in (typing.Union, getattr(types, "UnionType", typing.Union))
    if optional:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
        origin = typing.get_origin(kind)
    if origin is list:
        return typing.get_args(kind)[0], True, optional
    return kind, False, optional


def _is_choice(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Choice)


def choice_message(key: str, value: Any, choice: type[Choice], *, in_list: bool) -> str:
    """`key=value is not one of [values]`; list items as `key: value is not one of [...]`."""
    if in_list:
        return f"{key}: {value!r} is not one of {choice.values()}"
    hint = _YAML_124 if str(value) == "124" else ""
    return f"{key}={value!r} is not one of {choice.values()}{hint}"


def field_choice(root: type, dotted: str) -> Optional[tuple[type[Choice], bool]]:
    """The Choice type of a dotted key of the schema (`a.b`, `a.list[2]`), and whether the key is a
    list item; None when the key is not a Choice field."""
    kind: Any = root
    item = False
    for part in dotted.split("."):
        name, index = re.fullmatch(r"([^\[]*)((?:\[\d+\])*)", part).groups()
        if not (dataclasses.is_dataclass(kind) and name in _hints(kind)):
            return None
        kind, is_list, _ = _unwrap(_hints(kind)[name])
        item = is_list and bool(index)
        if is_list and not index:  # the whole list: report by its first bad item instead
            return None
    return (kind, item) if _is_choice(kind) else None


def check_choices(obj: Any, prefix: str = "") -> None:
    """Every Choice field of a (nested) config dataclass holds one of its values. Loading makes them
    members already; this covers configs built or changed in code (compress's stage configs)."""
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        kind, is_list, optional = _unwrap(_hints(type(obj))[f.name])
        if dataclasses.is_dataclass(value):
            check_choices(value, key + ".")
        elif is_list and dataclasses.is_dataclass(kind):
            for i, v in enumerate(value or ()):
                check_choices(v, f"{key}[{i}].")
        elif _is_choice(kind):
            if value is None and optional:
                continue
            for v in (value if is_list else [value]):
                if v not in kind.values():
                    raise ConfigError(choice_message(key, v, kind, in_list=is_list))

"""The typed builder: a YAML mapping -> a schema dataclass, each value checked against its field's
type, range and choices; every error is a ConfigError naming the dotted key."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from .fields import ConfigError, check_limits, type_name


def _number(value: Any, key: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _union(value: Any, tp: Any, key: str) -> Any:
    """The first member of a Union that accepts the value; else one error naming each member tried
    and why it refused."""
    why = []
    for member in typing.get_args(tp):
        if member is type(None):
            if value is None:
                return None
            why.append("null: not null")
            continue
        try:
            return check_type(value, member, key)
        except ConfigError as e:
            text = str(e)
            why.append(f"{type_name(member)}: {text[len(key) + 2:] if text.startswith(key + ': ') else text}")
    tried = ", ".join(type_name(m) for m in typing.get_args(tp))
    raise ConfigError(f"{key}: {value!r} matches none of {tried} ({'; '.join(why)})")


def check_type(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (a YAML number string read as a float, a mapping built as its dataclass)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        return _union(value, tp, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, key)
    if tp is float:
        return _number(value, key)
    expected = {int: "an integer", bool: "true/false", str: "a string"}
    if tp in expected:
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {expected[tp]}, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        return [check_type(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported schema type {tp}")


def _variant(cls, name: str, tag: str, choices: dict, kwargs: dict, data: dict, key: str):
    """A tagged-union field: its class picked by the sibling field `tag`."""
    tag_value = kwargs.get(tag, next(f.default for f in dataclasses.fields(cls) if f.name == tag))
    variant = choices[tag_value]
    value = data.get(name)
    if variant is None:
        if value is not None:
            raise ConfigError(f"{key}: a {tag} {tag_value} has no {name}")
        return None
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    try:
        return build(variant, value or {}, key)
    except ConfigError as e:
        where, _, rest = str(e).partition(": ")
        if rest.startswith("unknown key (") and where.rpartition(".")[0] == key:
            # a key of another variant, e.g. model.image in a classify recipe: say so
            raise ConfigError(f"{where}: unknown key for {tag} {tag_value}{rest[len('unknown key'):]}") from None
        raise


def build(cls, data: dict, prefix: str = ""):
    """A typed `cls` from a YAML mapping. Fields listed in `cls.__variants__` are tagged unions:
    their class is picked by a sibling field (model: by task, a modality's tower: by kind), so a
    key that belongs to another variant is an unknown key naming the variant."""
    hints = typing.get_type_hints(cls)
    variants = getattr(cls, "__variants__", {})
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data and f.name not in variants:
            kwargs[f.name] = check_type(data[f.name], hints[f.name], key)
            check_limits(f, kwargs[f.name], key)
    for name, (tag, choices) in variants.items():
        kwargs[name] = _variant(cls, name, tag, choices, kwargs, data, f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)

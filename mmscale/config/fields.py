"""What every schema field carries: a default, its help text and, where meaningful, the range
its value must lie in (`f`), plus the error every recipe problem is raised as."""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A problem with a recipe; the message starts with the dotted key."""


_INTERVAL = re.compile(r"^([\[(])\s*(\S+?)\s*,\s*(\S+?)\s*([\])])$")
_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: "[0, 1)", "(0, 1]", ">= 0", "> 0" (written as in the schema)."""
    text: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @classmethod
    def parse(cls, text: str) -> "Range":
        if m := _INTERVAL.match(text):
            return cls(text, float(m[2]), float(m[3]), m[1] == "(", m[4] == ")")
        if m := _BOUND.match(text):
            op, bound = m[1], float(m[2])
            if op.startswith(">"):
                return cls(text, lo=bound, lo_open=op == ">")
            return cls(text, hi=bound, hi_open=op == "<")
        raise ValueError(f"range {text!r}: write it as [lo, hi), (lo, hi], >= lo, > lo, <= hi or < hi")

    def __contains__(self, value) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def __str__(self) -> str:
        return f"in {self.text}" if self.text[0] in "[(" else self.text


def f(default: Any, help: str, range: str | None = None, choices: tuple | None = None) -> Any:
    """A schema field: `default` (a list or dict is copied per instance, a dataclass is built), its
    help text, and optionally the range (Range.parse syntax) or choices its value must meet."""
    meta = {"help": help, "range": Range.parse(range) if range else None, "choices": choices}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def limits(field: dataclasses.Field) -> str:
    """The field's range or choices as text ("in [0, 1)", "one of 0, 1, 2, 3"), "" if it has none."""
    if field.metadata.get("range") is not None:
        return str(field.metadata["range"])
    if field.metadata.get("choices"):
        return "one of " + ", ".join(map(str, field.metadata["choices"]))
    return ""


def check_limits(field: dataclasses.Field, value: Any, key: str) -> None:
    """ConfigError naming `key` when a (type-checked) value is outside the field's range or choices."""
    rng, choices = field.metadata.get("range"), field.metadata.get("choices")
    if rng is not None and value is not None and value not in rng:
        raise ConfigError(f"{key}: must be {rng}, got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def type_name(tp: Any) -> str:
    """A schema type as a recipe writer reads it: int, float or null, infonce|siglip, list of X."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}s"
    if tp is dict or origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))

"""Every recipe key with its type, default, range and help, read from the schema's field
metadata: `mmscale-train --explain [KEY]` prints them, and `python -m mmscale.config.doc >
docs/CONFIG.md` writes the docs table (a test checks the committed file is current).

model: and loss: depend on the task (and a modality's tower: on its kind): a key is listed once
per variant with the condition it needs, e.g. `model.temperature [task clip]`; list items are
written `<i>` (model.modalities.<i>.name), and any index is accepted when asking."""
from __future__ import annotations

import dataclasses
import difflib
import json
import textwrap
import typing
from dataclasses import dataclass

from .fields import ConfigError, limits, type_name
from .schema import Config


@dataclass(frozen=True)
class Key:
    key: str  # dotted; list items as <i>
    type: str
    default: str  # JSON (valid YAML); "" for a section
    help: str
    limits: str  # "in [0, 1)", "one of 0, 1, 2, 3" or ""
    when: tuple = ()  # conditions, e.g. (("task", "classify"), ("kind", "image"))
    owner: type = Config  # the dataclass that holds the field
    section: type | None = None  # the dataclass of a section key

    @property
    def condition(self) -> str:
        return ", ".join(f"{tag} {value}" for tag, value in self.when)


def _default(field: dataclasses.Field) -> str:
    value = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return json.dumps(value)


def _doc(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


def keys(cls: type = Config, prefix: str = "", when: tuple = ()) -> list[Key]:
    """Every key under `cls`, sections before their keys, each variant of a tagged union in turn."""
    out = []
    hints = typing.get_type_hints(cls)
    variants = getattr(cls, "__variants__", {})
    for field in dataclasses.fields(cls):
        key, tp, help = prefix + field.name, hints[field.name], field.metadata["help"]
        if field.name in variants:
            tag, choices = variants[field.name]
            for value, sub in choices.items():
                if sub is not None:
                    cond = when + ((tag, value),)
                    out.append(Key(key, "mapping", "", f"{help}. {_doc(sub)}", "", cond, cls, sub))
                    out += keys(sub, key + ".", cond)
        elif dataclasses.is_dataclass(tp):
            out.append(Key(key, "mapping", "", f"{help}. {_doc(tp)}", "", when, cls, tp))
            out += keys(tp, key + ".", when)
        else:
            out.append(Key(key, type_name(tp), _default(field), help, limits(field), when, cls))
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
            if dataclasses.is_dataclass(item):
                out += keys(item, key + ".<i>.", when)
    return out


def _normalise(key: str) -> str:
    return ".".join("<i>" if part.isdigit() else part for part in key.split("."))


def _for_task(entries: list[Key], task: str | None) -> list[Key]:
    return [k for k in entries if task is None or dict(k.when).get("task", task) == task]


def lookup(key: str | None = None, task: str | None = None) -> list[Key]:
    """The keys at and under `key` (all without one), for `task` only if given; ConfigError naming
    close matches for an unknown key."""
    every = keys()
    entries = _for_task(every, task)
    if key is None:
        return entries
    want = _normalise(key)
    found = [k for k in entries if k.key == want or k.key.startswith(want + ".")]
    if found:
        return found
    names = list(dict.fromkeys(k.key for k in entries))
    if any(k.key == want for k in every):
        tasks = sorted({dict(k.when)["task"] for k in every if k.key == want})
        raise ConfigError(f"{key}: not a key of task {task} (task {', '.join(tasks)} has it)")
    close = difflib.get_close_matches(want, names, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else " (mmscale-train --explain lists every key)"
    raise ConfigError(f"{key}: unknown key{hint}")


def explain(key: str | None = None, task: str | None = None) -> str:
    """The terminal listing: a line per key (type = default, range, [condition]) and its help below."""
    lines = []
    for k in lookup(key, task):
        head = f"{k.key}: {k.type}" + (f" = {k.default}" if k.default else "") + (f", {k.limits}" if k.limits else "")
        lines.append(head + (f"  [{k.condition}]" if k.condition else ""))
        lines.append(textwrap.fill(k.help, 100, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _link(cls: type, condition: str = "") -> str:
    return f"[{cls.__name__}](#{cls.__name__.lower()})" + (f" ({condition})" if condition else "")


def _row(cls: type, field: dataclasses.Field, tp) -> str:
    """A field's table row; a section's help links to its table (each variant's, for a tagged union)."""
    help, variants = field.metadata["help"], getattr(cls, "__variants__", {})
    item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
    if field.name in variants:
        tag, choices = variants[field.name]
        links = [_link(sub, f"{tag} {value}") for value, sub in choices.items() if sub is not None]
        kind, default, help = "mapping", "", f"{help}: " + ", ".join(links)
    elif dataclasses.is_dataclass(tp):
        kind, default, help = "mapping", "", f"{help}: {_link(tp)}"
    else:
        kind, default = type_name(tp), f"`{_default(field)}`"
        if dataclasses.is_dataclass(item):
            help = f"{help}: {_link(item)} each"
    return f"| `{field.name}` | {_cell(kind)} | {_cell(default)} | {limits(field)} | {_cell(help)} |"


def _places(entries: list[Key]) -> dict[type, list[str]]:
    """Where each schema dataclass sits in a recipe: its keys, with their conditions."""
    places = {k.owner: [] for k in entries}
    places[Config] = ["top level"]
    for k in entries:
        where = f" ({k.condition})" if k.condition else ""
        if k.section is not None:
            places[k.section].append(f"`{k.key}`{where}")
        elif k.type == "list of mappings":
            item = typing.get_args(typing.get_type_hints(k.owner)[k.key.rpartition(".")[2]])[0]
            places[item].append(f"`{k.key}.<i>`{where}")
    return places


def markdown() -> str:
    """docs/CONFIG.md: one table per schema dataclass, headed by every place it sits in a recipe."""
    places = _places(keys())
    out = ["# Recipe keys", "",
           "Generated from the schema (mmscale/config/schema.py) by `python -m mmscale.config.doc > docs/CONFIG.md`;",
           "tests/test_config.py checks this file is current. `mmscale-train --explain [KEY]` shows the same in a",
           "terminal. `model:` and `loss:` hold the keys of the recipe's `task`, a modality's `tower:` those of its",
           "`kind`; list items are numbered in overrides (`model.modalities.0.name=image`). Defaults are YAML.", ""]
    for cls, where in places.items():
        out += [f"## {cls.__name__}", "", "At " + ", ".join(dict.fromkeys(where)) + ".", "", _doc(cls), "",
                "| key | type | default | range | help |", "| --- | --- | --- | --- | --- |"]
        hints = typing.get_type_hints(cls)
        out += [_row(cls, field, hints[field.name]) for field in dataclasses.fields(cls)]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")

"""Recipes: YAML files with `base:` inheritance and dotted `key.sub=value` overrides, read into
a typed, validated Config; and a Config saved back as YAML."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from ..files import atomic_write
from .build import build
from .fields import ConfigError
from .schema import Config
from .validate import validate, validate_files


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """key.sub=value; a number indexes a list (model.modalities.0.key=3)."""
    parts = dotted.split(".")
    node = tree
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"{dotted}: {p} is not an index of a list of {len(node)}")
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            else:
                if node.get(p) is None:
                    node[p] = {}
                node = node[p]
        else:
            raise ConfigError(f"{dotted}: {parts[i - 1]} is not a mapping")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are key.sub=value")
        key, raw = item.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(raw) if raw != "" else ""))
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {e.problem}") from None
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(path: str, _seen: tuple = ()) -> dict:
    """A recipe's YAML tree. `base: other.yaml` (relative to the recipe) starts from that recipe
    and overrides it key by key, so method variants state only what differs."""
    if not os.path.isfile(path):
        raise ConfigError(f"recipe: file not found: {path}")
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"recipe: {path}: base recipes form a cycle")
    with open(path) as f:
        try:
            tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe: {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe: {path} must be a mapping at top level")
    base = tree.pop("base", None)
    if base is not None:
        tree = _merge(read_recipe(os.path.join(os.path.dirname(path), str(base)), _seen + (os.path.abspath(path),)), tree)
    return tree


def load_config(path: str | None, overrides: list[str] = (), check_files: bool = True) -> Config:
    """The typed, validated config of a recipe (or a run's saved config.yaml) with overrides.
    check_files=False skips the checks that data and weight files exist: a saved run's model can
    be rebuilt on a machine without its training data."""
    tree = read_recipe(path) if path else {}
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    return config_from_dict(tree, check_files)


def config_from_dict(tree: dict, check_files: bool = True) -> Config:
    cfg = build(Config, tree)
    validate(cfg)
    if check_files:
        validate_files(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    atomic_write(str(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))

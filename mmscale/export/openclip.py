"""An export open_clip opens offline: `open_clip.create_model_and_transforms("local-dir:FOLDER")`
(and CLIP_benchmark, which calls it).

    FOLDER/open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}
    FOLDER/open_clip_model.safetensors  the weights under open_clip's names (models/open_clip_layout.py)
    FOLDER/config.json, tokenizer files an HF text tower's architecture and tokenizer

Two model forms have an open_clip counterpart: open_clip towers without heads (open_clip's CLIP)
and timm + HF towers with `model.heads.style: open_clip` heads or none (CustomTextCLIP); for any
other, `blocker` says why in one line. The preprocess is our evaluation transform: resize the
short side (bicubic), centre crop, CLIP's mean and std.

open_clip reads an HF architecture from `text_cfg.hf_model_name` relative to the working
directory, so that entry is FOLDER's absolute path: a moved folder needs it rewritten (or
mmscale-export run again).
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from ..config import ClipModelConfig, Config, ConfigError
from ..data.images import CLIP_MEAN, CLIP_STD
from ..files import atomic_path, atomic_write_json
from ..models.open_clip_layout import blocker as layout_blocker
from ..models.open_clip_layout import to_open_clip
from ..models.towers import sized_open_clip_kwargs

CONFIG, WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"


def blocker(cfg: Config) -> str | None:
    """Why this run's model cannot be written in open_clip's format (one line), or None; checked
    when a run with train.export_format=open_clip starts, so a long run does not find out at its end."""
    if cfg.task != "clip":
        return f"train.export_format: open_clip holds a CLIP (task clip); this run's task is {cfg.task}"
    reason = layout_blocker(cfg.model)
    if reason or cfg.model.image.source != "timm":
        return reason
    return _timm_size_blocker(cfg.model)


def _timm_size_blocker(m: ClipModelConfig) -> str | None:
    """open_clip builds a timm tower at the model's own input size: a ViT trained at another size
    has position embeddings open_clip's model has no room for."""
    import timm
    with torch.device("meta"):
        trunk = timm.create_model(m.image.name, pretrained=False)
    own = getattr(getattr(trunk, "patch_embed", None), "img_size", None)
    if own is not None and getattr(trunk, "pos_embed", None) is not None \
            and tuple(own) != (m.image.image_size, m.image.image_size):
        return (f"model.image.image_size: open_clip builds timm's {m.image.name} at its own input size {own[0]} "
                f"(its position embeddings fix it); this model is {m.image.image_size}")
    return None


def _open_clip_cfg(name: str, kwargs: dict, image_size: int | None) -> dict:
    """The model_cfg an open_clip tower of ours was built from: its kwargs sized as towers.py
    sizes them, then open_clip's own config (inline, or the named one with its force_* kwargs)."""
    import open_clip
    kwargs = sized_open_clip_kwargs(kwargs, image_size)
    if "model_cfg" in kwargs:
        cfg = json.loads(json.dumps(kwargs["model_cfg"]))
    else:
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise ConfigError(f"model.image.name / model.text.name: {name!r} is not an open_clip model config")
        if kwargs.get("force_image_size"):
            cfg["vision_cfg"] = {**cfg.get("vision_cfg", {}), "image_size": kwargs["force_image_size"]}
    if kwargs.get("force_quick_gelu"):
        cfg["quick_gelu"] = True
    cfg.get("vision_cfg", {}).pop("patch_dropout", None)  # training only
    return cfg


def model_cfg(model: torch.nn.Module, folder: str) -> dict:
    """open_clip's model_cfg for our model (a DualEncoder with an open_clip form)."""
    m: ClipModelConfig = model.cfg
    if m.image.source == "open_clip":
        image = _open_clip_cfg(m.image.name, m.image.kwargs, m.image.image_size)
        text = _open_clip_cfg(m.text.name, m.text.config_overrides, None)
        rest = {k: v for k, v in image.items() if k not in ("vision_cfg", "text_cfg", "embed_dim")}
        other = {k: v for k, v in text.items() if k not in ("vision_cfg", "text_cfg", "embed_dim")}
        if rest != other:
            raise ConfigError(f"model.image.name / model.text.name: their open_clip configs differ outside the towers "
                              f"({rest} vs {other}); open_clip's CLIP has one setting for both")
        out = {**rest, "embed_dim": model.image_tower.width, "vision_cfg": image["vision_cfg"],
               "text_cfg": text["text_cfg"]}
    else:
        heads = m.heads.enabled
        trunk = model.image_tower.model
        pool = getattr(trunk, "global_pool", "")
        out = {
            "embed_dim": m.heads.output_dim if heads else model.image_tower.width,
            "custom_text": True,
            "vision_cfg": {"timm_model_name": m.image.name, "timm_model_pretrained": False,
                           "timm_pool": getattr(pool, "pool_type", pool), "timm_proj": "mlp" if heads else "none",
                           "timm_proj_bias": False, "image_size": m.image.image_size},
            "text_cfg": {"hf_model_name": os.path.abspath(folder), "hf_tokenizer_name": os.path.abspath(folder),
                         "hf_model_pretrained": False, "hf_proj_type": "mlp" if heads else None,
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": m.text.max_length},
        }
    if model.logit_bias is not None:
        out["init_logit_bias"] = float(model.logit_bias.value.detach()[0])
    return out


def preprocess_cfg(model: torch.nn.Module) -> dict:
    """Our evaluation transform (data/images.py: image_transform) in open_clip's terms."""
    return {"size": model.cfg.image.image_size, "mode": "RGB", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def save_open_clip(model: torch.nn.Module, folder: str) -> str:
    """Writes `model` (a DualEncoder, weights complete on this process) as an open_clip folder.
    The model open_clip builds from the written config takes the weights strictly first: a
    mismatch is a ConfigError and leaves no folder behind."""
    import open_clip
    from safetensors.torch import save_file
    reason = layout_blocker(model.cfg)
    if reason:
        raise ConfigError(reason)
    created = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        if model.cfg.text.source == "hf":
            model.text_tower.save_pretrained(folder)  # config.json + tokenizer, read by open_clip's HFTokenizer
        cfg = model_cfg(model, folder)
        state = to_open_clip(model)
        cls = open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP
        probe = cls(**{k: v for k, v in cfg.items() if k != "custom_text"})
        try:
            probe.load_state_dict(state, strict=True)
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:300]
            raise ConfigError(f"open_clip's model from this config does not take the weights: {detail}") from None
        with atomic_path(os.path.join(folder, WEIGHTS)) as tmp:
            save_file(state, tmp)
        atomic_write_json(os.path.join(folder, CONFIG), {"model_cfg": cfg, "preprocess_cfg": preprocess_cfg(model)})
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder

"""A DualEncoder's weights in open_clip's layout, both ways.

open_clip keeps a CLIP as `visual.*` (the image tower with its projection), the text tower at the
top level (`token_embedding`, `transformer.*`, `text_projection`, ...) or under `text.*`
(CustomTextCLIP: `text.transformer.*` for an HF model, `text.proj.*` for its MLP), and a 0-dim
`logit_scale` (log 1/tau, as ours) and `logit_bias`. Two of our models have that form:
- open_clip towers without heads: open_clip's CLIP (the towers' own projections);
- a timm image tower and an HF text tower, with `model.heads.style: open_clip` heads or none:
  CustomTextCLIP (`visual.trunk.*` + `visual.head.mlp.*`, `text.transformer.*` + `text.proj.*`).
`names` maps one to the other; the export (export/openclip.py) writes with it and `model.init`
reads a released CLIP with it.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..config import ClipModelConfig, ConfigError

# (our prefix, open_clip's) per tower source; a tower's own keys follow unchanged
TOWER_PREFIX = {("image", "open_clip"): ("image_tower.model.", "visual."),
                ("image", "timm"): ("image_tower.model.", "visual.trunk."),
                ("text", "open_clip"): ("text_tower.model.", ""),
                ("text", "hf"): ("text_tower.model.", "text.transformer.")}
HEAD_NAMES = {"image_head.0.": "visual.head.mlp.fc1.", "image_head.2.": "visual.head.mlp.fc2.",
              "text_head.0.": "text.proj.0.", "text_head.2.": "text.proj.2."}
SCALARS = {"logit_scale.log_value": "logit_scale", "logit_bias.value": "logit_bias"}


def blocker(cfg: ClipModelConfig) -> str | None:
    """Why this model has no open_clip form (one line naming the key), or None."""
    img, txt, heads = cfg.image, cfg.text, cfg.heads
    if cfg.fusion.type != "none":
        return f"model.fusion.type: {cfg.fusion.type} has no open_clip form (open_clip's towers never share a block)"
    if (img.source, txt.source) == ("open_clip", "open_clip"):
        if heads.enabled:
            return ("model.heads.enabled: open_clip's CLIP has no MLP heads over its towers' projections; a model "
                    "trained with model.heads.enabled=false (the towers' own projections) exports")
        allowed = {"model_cfg", "force_image_size", "force_quick_gelu", "force_patch_dropout"}
        for key, kwargs in (("model.image.kwargs", img.kwargs), ("model.text.config_overrides", txt.config_overrides)):
            if set(kwargs) - allowed:
                return f"{key}: {sorted(set(kwargs) - allowed)} have no place in open_clip_config.json"
        return None
    if (img.source, txt.source) == ("timm", "hf"):
        if heads.enabled and heads.style != "open_clip":
            return ("model.heads.style: cmla heads (ReLU, biases, hidden_dim wide) are not open_clip's mlp projections "
                    "(GELU, fixed widths); train with model.heads.style=open_clip to export to open_clip")
        if img.kwargs:
            return (f"model.image.kwargs: open_clip builds a timm tower from its name alone; {sorted(img.kwargs)} "
                    "cannot be expressed (pick a timm model name that has them)")
        return None
    return (f"model.image.source/model.text.source: {img.source} + {txt.source} has no open_clip form "
            "(open_clip + open_clip, or timm + hf)")


def names(model: nn.Module, strict: bool = True) -> dict[str, str]:
    """{our state-dict key: open_clip's}. strict: every weight, for a model that has an open_clip
    form (else a ConfigError saying why); not strict (model.init): the towers' weights and the
    temperature, leaving out heads open_clip has no counterpart of (they keep their init)."""
    cfg: ClipModelConfig = model.cfg
    reason = blocker(cfg)
    if reason and strict:
        raise ConfigError(reason)
    rules = [TOWER_PREFIX[("image", cfg.image.source)], TOWER_PREFIX[("text", cfg.text.source)]]
    if (cfg.image.source, cfg.text.source) == ("timm", "hf") and cfg.heads.style == "open_clip":
        rules += HEAD_NAMES.items()
    out = {}
    for key in model.state_dict():
        name = key.replace(".parametrizations.", ".").replace(".original", "") if ".parametrizations." in key else key
        if name in SCALARS:
            out[key] = SCALARS[name]
            continue
        theirs = next((t + name[len(o):] for o, t in rules if name.startswith(o)), None)
        if theirs is not None:
            out[key] = theirs
        elif strict:
            raise ConfigError(f"{key}: no open_clip name for this weight")
    return out


def to_open_clip(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under open_clip's names (float32, CPU; 0-dim where open_clip's are)."""
    state = model.state_dict()
    out = {}
    for ours, theirs in names(model).items():
        v = state[ours].detach().to("cpu", torch.float32)
        out[theirs] = (v.reshape(()) if ours in SCALARS or ".parametrizations." in ours else v).contiguous().clone()
    return out


def from_open_clip(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads open_clip-named weights into the model's towers and temperature, shapes checked; a
    missing or mis-shaped weight, or one the model has no place for, is a ConfigError naming it
    and `source`. A logit bias the file lacks (a CLIP, not a SigLIP) keeps the recipe's init."""
    own = model.state_dict()
    mine = names(model, strict=False)
    unexpected = sorted(set(state) - set(mine.values()) - {"attn_mask", "visual.attn_mask"})
    if unexpected:
        raise ConfigError(f"model.init: {source} holds {unexpected[:3]} ({len(unexpected)} weights) the recipe's "
                          "model has no place for (another architecture? check model.image.name / model.text.name)")
    loaded = {}
    for ours, theirs in mine.items():
        if theirs not in state:
            if theirs == "logit_bias":
                continue
            raise ConfigError(f"model.init: {source} has no {theirs} (the recipe's model needs it: another "
                              "architecture? check model.image.name / model.text.name)")
        v = state[theirs].reshape(own[ours].shape) if state[theirs].numel() == own[ours].numel() else state[theirs]
        if v.shape != own[ours].shape:
            raise ConfigError(f"model.init: {theirs} is {list(state[theirs].shape)} in {source}, "
                              f"{list(own[ours].shape)} in the recipe's model (check model.image.name / image_size / "
                              "model.text.name)")
        loaded[ours] = v.to(own[ours].dtype)
    model.load_state_dict(loaded, strict=False)


def read_checkpoint(spec: str) -> tuple[dict[str, torch.Tensor], str]:
    """(open_clip state dict, where it came from) for `model.init`: open_clip:<MODEL>/<TAG> from
    open_clip's download cache, a checkpoint file, or a folder open_clip opens as local-dir:."""
    path = spec
    if spec.startswith("open_clip:"):
        path = _released(spec[len("open_clip:"):])
    elif os.path.isdir(spec):
        found = [os.path.join(spec, n) for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                                                 "open_clip_pytorch_model.pth") if os.path.isfile(os.path.join(spec, n))]
        if not found:
            raise ConfigError(f"model.init: {spec} holds no open_clip_model.safetensors or open_clip_pytorch_model.bin")
        path = found[0]
    elif not os.path.isfile(spec):
        raise ConfigError(f"model.init: {spec} not found (open_clip:<MODEL>/<TAG>, a checkpoint file or an "
                          "open_clip folder)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:  # open_clip's trainer checkpoints
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.init: {path} is not a state dict of tensors (an open_clip checkpoint)")
    if state and all(k.startswith("module.") for k in state):  # saved from DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, path


def _released(name: str) -> str:
    """The cached file of a released open_clip checkpoint, MODEL/TAG (open_clip.list_pretrained())."""
    import open_clip
    model, _, tag = name.partition("/")
    cfg = open_clip.get_pretrained_cfg(model, tag) if tag else {}
    if not cfg:
        raise ConfigError(f"model.init: open_clip:{name} is not a released open_clip model/tag "
                          "(open_clip.list_pretrained() lists them, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k)")
    try:
        return open_clip.download_pretrained(cfg)
    except Exception as e:  # offline and not cached
        raise ConfigError(f"model.init: open_clip:{name} is not in the local download cache and the hub cannot be "
                          f"reached ({str(e).splitlines()[0][:120]}); download it once where there is internet, or "
                          "give a local checkpoint path") from None

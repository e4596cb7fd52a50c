"""The optimizer's parameter groups: which parameters are decayed, and each one's LR scale.

- Weight decay (optim.decay_exclusions): none for 1-d parameters, norm layers, biases and the
  logit scale/bias, the rule open_clip's trainer applies (there, by name: ndim < 2, "bn", "ln",
  "bias", "logit_scale"); here by what a parameter is, so it holds for any tower's naming.
- LR scale = the layer-wise decay of its tower block (optim.layer_decay) x the multiplier of the
  longest prefix of its name in optim.lr_mult.

Parameters with the same (weight decay, LR scale) share one group, so DeepSpeed's ZeRO flattens a
handful of buffers, not one per tensor. Each group carries "lr_scale": the LR schedule multiplies
every group's own initial LR, and the logged LR is the base one (group LR / lr_scale).
"""
from __future__ import annotations

import re

import torch.nn as nn

from ..config import ConfigError, OptimConfig
from ..models.towers import layer_ids

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm,
         nn.modules.batchnorm._NormBase)  # BatchNorm*, InstanceNorm*
def excluded_from_decay(model: nn.Module) -> set[str]:
    """Names of the parameters open_clip's rule keeps out of weight decay."""
    out = set()
    for mod_name, module in model.named_modules():
        own_norm = isinstance(module, NORMS)
        for name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{name}" if mod_name else name
            if p.ndim < 2 or own_norm or name.endswith("bias") or "logit_scale" in full or "logit_bias" in full:
                out.add(full)
    return out


def lr_scales(model: nn.Module, o: OptimConfig) -> dict[str, float]:
    """{trainable parameter name: LR scale}; a key of optim.lr_mult matching no parameter is a
    ConfigError naming it."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    scale = dict.fromkeys(names, 1.0)
    if o.layer_decay != 1.0 and hasattr(model, "named_towers"):
        by_param = {id(p): n for n, p in model.named_parameters()}
        for tower in model.named_towers().values():
            ids, count = layer_ids(tower)
            for n, p in tower.named_parameters():
                full = by_param.get(id(p))
                if full in scale and n in ids:
                    scale[full] *= o.layer_decay ** (count + 1 - ids[n])
    for key, mult in o.lr_mult.items():
        hits = [n for n in names if n == key or n.startswith(key + ".")]
        if not hits:
            prefixes = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"optim.lr_mult.{key}: matches no trainable parameter (the model's top-level "
                              f"names: {', '.join(prefixes)})")
        for n in hits:  # a longer prefix wins over a shorter one
            if max((k for k in o.lr_mult if n == k or n.startswith(k + ".")), key=len) == key:
                scale[n] *= float(mult)
    return scale


def parameter_groups(model: nn.Module, o: OptimConfig) -> list[dict]:
    """The trainable parameters in groups of equal (weight decay, LR scale), in the model's order
    of first appearance, each with its own "lr", "weight_decay" and "lr_scale"."""
    no_decay = excluded_from_decay(model) if o.decay_exclusions else set()
    scales = lr_scales(model, o)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if name in no_decay else o.weight_decay
        key = (wd, scales[name])
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": wd, "lr_scale": scales[name], "lr": o.lr * scales[name]}
        groups[key]["params"].append(p)
    return list(groups.values())


def describe(groups: list[dict]) -> list[dict]:
    """One line of numbers per group, for the run's log."""
    return [{"tensors": len(g["params"]), "numel": sum(p.numel() for p in g["params"]),
             "weight_decay": g["weight_decay"], "lr_scale": round(g["lr_scale"], 6)} for g in groups]


class GroupSettings:
    """Each group's LR, weight decay and LR scale as checkpointed state of its own, loaded after
    DeepSpeed's: resuming on another number of ranks (DeepSpeed's universal checkpoint, ZeRO 1-3)
    gives every group one LR and one weight decay (seen with DeepSpeed 0.19.8: 12 groups came back
    with the same values), so a resumed layer-decayed run would train another model."""

    KEYS = ("lr", "weight_decay", "lr_scale")

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return {"groups": [{k: g[k] for k in self.KEYS if k in g} for g in self.optimizer.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        groups = state["groups"]
        if len(groups) != len(self.optimizer.param_groups):
            raise RuntimeError(f"the checkpoint has {len(groups)} parameter groups, this run {len(self.optimizer.param_groups)} "
                               "(optim.weight_decay / decay_exclusions / layer_decay / lr_mult changed?); rerun with the "
                               "checkpoint's recipe, or train.resume=false to start over")
        for group, saved in zip(self.optimizer.param_groups, groups):
            group.update(saved)

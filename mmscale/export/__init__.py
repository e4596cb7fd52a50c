"""Exports and checkpoints -> models, offline.

An export is a folder with `model.safetensors` (every weight, frozen towers included, float32)
and `config.yaml` (the run's resolved config with every tower marked not pretrained), plus each
HF text tower's architecture and tokenizer in `text_<name>/`. `load_export` rebuilds the model
from the folder alone: no hub, no training data. `load_model` also takes a run folder or a
DeepSpeed checkpoint of any ZeRO stage (tools/eval.py). `openclip.save_open_clip` writes the
folder open_clip opens (`local-dir:`): in export/open_clip/ with train.export_format=open_clip,
anywhere with mmscale-export.
"""
from __future__ import annotations

import copy
import glob
import os

import torch

from ..config import Config, TextTowerConfig, load_config, save_config, tower_configs
from ..files import LATEST, RunDir, atomic_path
from ..models import build_model
from ..models.towers import export_tower_config

WEIGHTS, CONFIG = "model.safetensors", "config.yaml"
OPEN_CLIP = "open_clip"  # train.export_format open_clip: <export>/open_clip/, open_clip's local-dir: folder


def save_export(model: torch.nn.Module, cfg: Config, folder: str) -> str:
    """Writes `model` (its parameters complete on this process) and what rebuilds it to folder."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(os.path.join(folder, WEIGHTS)) as tmp:
        save_file(state, tmp)
    cfg = copy.deepcopy(cfg)
    if cfg.task == "clip":
        cfg.model.init = ""  # the weights are here now
    towers = model.named_towers()
    for name, tower_cfg in tower_configs(cfg.model).items():
        export_tower_config(towers[name], tower_cfg, folder, f"text_{name}")
    save_config(cfg, os.path.join(folder, CONFIG))
    if cfg.train.export_format == "open_clip":
        from .openclip import save_open_clip
        save_open_clip(model, os.path.join(folder, OPEN_CLIP))
    return folder


def _read_config(path: str) -> Config:
    # the training data and pretrained weights need not be on this machine; a checkpoint or an
    # export holds every weight model.init gave
    cfg = load_config(path, check_files=False)
    if cfg.task == "clip":
        cfg.model.init = ""
    return cfg


def load_export(folder: str, map_location="cpu") -> torch.nn.Module:
    """The exported model, in eval mode."""
    return _load_export(folder, map_location)[0]


def _load_export(folder: str, map_location="cpu") -> tuple[torch.nn.Module, Config]:
    from safetensors.torch import load_model as load_weights
    cfg = _read_config(os.path.join(folder, CONFIG))
    for tower in tower_configs(cfg.model).values():
        if isinstance(tower, TextTowerConfig) and tower.source == "hf" and not os.path.isabs(tower.name) \
                and os.path.isdir(os.path.join(folder, tower.name)):
            tower.name = os.path.join(folder, tower.name)
    model = build_model(cfg)
    load_weights(model, os.path.join(folder, WEIGHTS), device=str(map_location))
    return model.eval(), cfg


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, WEIGHTS)) and os.path.isfile(os.path.join(path, CONFIG))


def find_checkpoint(path: str) -> tuple[str, str, str]:
    """(run folder, checkpoints folder, tag) for a run, its checkpoints/ or one checkpoints/<tag>."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.isfile(os.path.join(path, LATEST)):
        with open(os.path.join(path, LATEST)) as f:
            return os.path.dirname(os.path.abspath(path)), path, f.read().strip()
    if glob.glob(os.path.join(path, "*model_states.pt")):
        ckpt_dir = os.path.dirname(os.path.abspath(path))
        return os.path.dirname(ckpt_dir), ckpt_dir, os.path.basename(os.path.abspath(path))
    raise FileNotFoundError(f"{path}: neither an export ({WEIGHTS} + {CONFIG}) nor a run or DeepSpeed checkpoint")


def checkpoint_state_dict(ckpt_dir: str, tag: str, zero_stage: int) -> dict:
    """The full float32 model weights of a DeepSpeed checkpoint: stage 0 keeps them whole in its
    model-states file; stages 1-3 keep them partitioned with the optimizer states, which
    DeepSpeed's zero_to_fp32 consolidates."""
    if zero_stage == 0:
        from deepspeed.checkpoint.constants import MODEL_FILE_PREFIX, MODEL_FILE_SUFFIX
        path = os.path.join(ckpt_dir, tag, f"{MODEL_FILE_PREFIX}00{MODEL_FILE_SUFFIX}")
        return torch.load(path, map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag)


def load_model(path: str) -> tuple[torch.nn.Module, str | None]:
    """(model in eval mode, its run folder or None) from an export, a run folder or a checkpoint."""
    model, _, run_dir = load_run_model(path)
    return model, run_dir


def load_run_model(path: str) -> tuple[torch.nn.Module, Config, str | None]:
    """(model in eval mode, the config it was built from, its run folder or None), as load_model."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found")
    if is_export(path):
        parent = os.path.dirname(os.path.abspath(path))
        model, cfg = _load_export(path)
        return model, cfg, parent if os.path.isfile(RunDir(parent).metrics) else None
    run_dir, ckpt_dir, tag = find_checkpoint(path)
    run = RunDir(run_dir)
    if not os.path.isfile(run.config):
        raise FileNotFoundError(f"{run.config}: missing (the run's resolved recipe)")
    cfg = _read_config(run.config)
    model = build_model(cfg)
    state = checkpoint_state_dict(ckpt_dir, tag, cfg.train.zero_stage)
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # frozen pretrained towers may be left out of a checkpoint; they were built from their weights above
    if unexpected or set(missing) & trainable:
        raise ValueError(f"{ckpt_dir}/{tag}: does not match the run's model "
                         f"(missing {sorted(set(missing) & trainable)[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), cfg, run_dir

"""Models: towers (towers.py), the CMLA dual encoder (dual_encoder.py), the fusion classifier of
UniS-MMC / M3CoL (classifier.py) and CBMF (cbmf.py), from shared layers (layers.py).

Models map a batch dict to a dict of outputs. They know nothing of ranks, DeepSpeed or files;
what the engine, tasks, evaluation and export may call on them is contract.py's."""
from __future__ import annotations

import torch.nn as nn

from ..config import Config
from .cbmf import CBMF
from .classifier import FusionClassifier
from .dual_encoder import DualEncoder
from .open_clip_layout import from_open_clip, read_checkpoint


def build_model(cfg: Config) -> nn.Module:
    """The model of a resolved config (task classify needs model.num_classes and the tabular
    input_dims filled in, which its task does from the data)."""
    if cfg.task == "clip":
        model = DualEncoder(cfg.model)
        if cfg.model.init:  # a released CLIP's towers and temperature (open_clip's layout)
            state, source = read_checkpoint(cfg.model.init)
            from_open_clip(model, state, source)
        return model
    if cfg.task == "classify":
        loss = cfg.loss
        return FusionClassifier(cfg.model, mixup_alpha=loss.mixup_alpha,
                                unimodal_heads=loss.unimodal_weight > 0 or loss.contrastive == "unis_mmc")
    if cfg.task == "cbmf":
        return CBMF(cfg.model)
    raise ValueError(f"task: {cfg.task!r} has no model")


__all__ = ["CBMF", "DualEncoder", "FusionClassifier", "build_model"]

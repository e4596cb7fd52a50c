"""When the learning rate changes and when training stops early: pure decisions over metrics,
each with state_dict/load_state_dict so a resumed run decides as the uninterrupted one would."""
from __future__ import annotations

import math

import torch

from ..config import EarlyStoppingConfig, OptimConfig, PlateauConfig


def lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float, step_size: int = 0, gamma: float = 0.1):
    """Linear warmup, then cosine decay to min_ratio (CMLA: Adam 1e-4, cosine), constant, or a
    step decay by gamma every step_size steps (M3CoL's StepLR)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "step":
            return gamma ** ((step - warmup) // step_size)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def step_lr_lambda(o: OptimConfig, total_steps: int):
    """The per-step LR factor of optim.schedule, or None for plateau (stepped on evaluations)."""
    if o.schedule == "plateau":
        return None
    return lr_lambda(o.warmup_steps, total_steps, o.schedule, o.min_lr_ratio, o.step_size, o.gamma)


def metric(metrics: dict, name: str, key: str) -> float:
    """metrics[name], or an error that names the recipe key and the metrics there are."""
    if name not in metrics:
        raise KeyError(f"{key}: the evaluation has no {name!r} (it has: {', '.join(sorted(metrics))})")
    return metrics[name]


class Plateau:
    """ReduceLROnPlateau on a logged metric, stepped at every evaluation (DeepSpeed steps its own
    scheduler every step without a metric, so this one lives beside it)."""

    def __init__(self, cfg: PlateauConfig, optimizer: torch.optim.Optimizer):
        self.metric = cfg.metric
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=cfg.mode, factor=cfg.factor, patience=cfg.patience)

    def update(self, metrics: dict) -> None:
        self.scheduler.step(metric(metrics, self.metric, "optim.plateau.metric"))

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


class EarlyStopping:
    """Tracks the best evaluation of train.early_stopping.metric and counts evaluations since;
    it decides, the trainer acts (export on improvement, stop after `patience` without)."""

    def __init__(self, cfg: EarlyStoppingConfig):
        self.cfg = cfg
        self.best = None  # {"value", "step", "metrics", "bad"}

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.metric)

    def update(self, step: int, metrics: dict) -> bool:
        """True if this evaluation is the best so far."""
        value = metric(metrics, self.cfg.metric, "train.early_stopping.metric")
        b = self.best
        if b is None or (value < b["value"] if self.cfg.mode == "min" else value > b["value"]):
            self.best = {"value": value, "step": step, "metrics": metrics, "bad": 0}
            return True
        b["bad"] += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.best is not None and self.best["bad"] >= self.cfg.patience

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]

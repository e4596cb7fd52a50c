"""Tasks: what the engine trains (base.py holds the contract). clip: CMLA pretraining;
classify: UniS-MMC, M3CoL and the concatenation baselines; cbmf: CBMF's Deep Fusion Encoder."""
from __future__ import annotations

from ..config import Config
from .base import Progress, Task
from .cbmf import CBMFTask
from .classify import ClassifyTask
from .clip import ClipTask

TASKS = {"clip": ClipTask, "classify": ClassifyTask, "cbmf": CBMFTask}


def build_task(cfg: Config, logger=None) -> Task:
    return TASKS[cfg.task](cfg, logger)


__all__ = ["CBMFTask", "ClassifyTask", "ClipTask", "Progress", "TASKS", "Task", "build_task"]

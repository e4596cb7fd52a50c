"""The one training engine (trainer.py) and its parts: DeepSpeed set-up and optimizer state
(backend.py), one training step and the temperature clamp (step.py), parameter groups: weight
decay, layer decay and LR multipliers (param_groups.py), LR schedules and early stopping
(schedule.py), the weight EMA (ema.py), checkpoints over registered state (checkpoint.py),
training state and stop signals (state.py), the lost-rank heartbeat (watchdog.py), metrics and
progress (logger.py)."""
from .checkpoint import CheckpointError
from .trainer import PREEMPTED_EXIT, Trainer, TrainingError
from .watchdog import LOST_RANK_EXIT

__all__ = ["CheckpointError", "LOST_RANK_EXIT", "PREEMPTED_EXIT", "Trainer", "TrainingError"]

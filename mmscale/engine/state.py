"""Small pieces of training state the engine checkpoints (each has state_dict/load_state_dict)."""
from __future__ import annotations

import signal

from ..dist import all_reduce_sum, any_rank, rank_and_world


class TrainState:
    """The step, and the mean training loss since the last evaluation (train/loss)."""

    def __init__(self):
        self.step = 0
        self.loss_sum, self.loss_steps = 0.0, 0

    def add_loss(self, loss: float) -> None:
        self.loss_sum, self.loss_steps = self.loss_sum + loss, self.loss_steps + 1

    def pop_mean_loss(self) -> dict:
        """{"train/loss": mean since the last call} (empty if no step ran since)."""
        out = {"train/loss": self.loss_sum / self.loss_steps} if self.loss_steps else {}
        self.loss_sum, self.loss_steps = 0.0, 0
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "loss_sum": self.loss_sum, "loss_steps": self.loss_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.loss_sum, self.loss_steps = state["step"], state["loss_sum"], state["loss_steps"]


class SkipCounter:
    """Unreadable samples replaced by the data pipeline, summed over ranks (see data/images.py)."""

    def __init__(self, device):
        self.device, self.count = device, 0

    def add(self, n: int) -> None:
        self.count += n

    def total(self) -> int:
        """The run's total so far; a collective, every rank calls it."""
        return int(all_reduce_sum(self.count, self.device))

    def state_dict(self) -> dict:
        return {"total": self.total()}

    def load_state_dict(self, state: dict) -> None:
        # rank 0 carries the total so far; the other ranks restart their own count
        self.count = state["total"] if rank_and_world()[0] == 0 else 0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # Slurm: preemption/scancel/requeue, --signal=USR1@secs


class StopSignals:
    """SIGTERM / SIGUSR1 only set a flag: the step in flight (and its collectives) finishes,
    then every rank checkpoints together at the same step boundary."""

    def __init__(self, device):
        self.device, self.received = device, 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """True on every rank once any rank got a stop signal (a collective)."""
        return any_rank(bool(self.received), self.device)

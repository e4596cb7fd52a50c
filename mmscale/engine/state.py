"""Small pieces of training state the engine checkpoints (each has state_dict/load_state_dict),
and the stop signals."""
from __future__ import annotations

import signal

import torch

from ..dist import HostFlag, all_reduce_sum, rank_and_world


class TrainState:
    """The step; the mean training loss since the last evaluation (train/loss); the steps whose
    loss or gradients were not finite, in all and in a row. Losses are summed on the device, so
    a step adds nothing to read back; the sums come to the host at logs, evaluations and saves."""

    def __init__(self, device):
        self.step = 0
        self.loss_sum = torch.zeros((), device=device)  # this rank's finite losses since the last evaluation
        self.loss_steps = 0
        self.nonfinite_losses = torch.zeros((), dtype=torch.int64, device=device)  # applied steps, loss not finite
        self.nonfinite, self.nonfinite_run = 0, 0  # skipped steps (known on the host when they happen)

    def add_loss(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss.float(), 0.0)
        self.nonfinite_losses += (~finite).long()
        self.loss_steps += 1
        self.nonfinite_run = 0

    def count_nonfinite(self) -> int:
        """Counts a skipped step; returns how many came in a row."""
        self.nonfinite, self.nonfinite_run = self.nonfinite + 1, self.nonfinite_run + 1
        return self.nonfinite_run

    def nonfinite_total(self) -> int:
        return self.nonfinite + int(self.nonfinite_losses)

    @staticmethod
    def global_mean(value: torch.Tensor) -> float:
        """The mean over ranks of a per-rank value (the local-loss variant differs per rank); a
        collective, every rank calls it."""
        return all_reduce_sum(value) / rank_and_world()[1]

    def pop_mean_loss(self) -> dict:
        """{"train/loss": mean over ranks and steps since the last call}; a collective."""
        total = self.global_mean(self.loss_sum)
        out = {"train/loss": total / self.loss_steps} if self.loss_steps else {}
        self.loss_sum.zero_()
        self.loss_steps = 0
        return out

    def state_dict(self) -> dict:
        """Rank-independent (the loss sum is averaged over ranks); a collective."""
        return {"step": self.step, "loss_sum": self.global_mean(self.loss_sum), "loss_steps": self.loss_steps,
                "nonfinite": self.nonfinite_total(), "nonfinite_run": self.nonfinite_run}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.loss_steps = state["step"], state["loss_steps"]
        self.loss_sum.fill_(state["loss_sum"])  # every rank holds the mean: averaging it again gives it back
        self.nonfinite, self.nonfinite_run = state["nonfinite"], state["nonfinite_run"]
        self.nonfinite_losses.zero_()


class SkipCounter:
    """Unreadable samples replaced by the data pipeline, summed over ranks (see data/images.py)."""

    def __init__(self):
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def total(self) -> int:
        """The run's total so far; a collective, every rank calls it."""
        return int(all_reduce_sum(self.count))

    def state_dict(self) -> dict:
        return {"total": self.total()}

    def load_state_dict(self, state: dict) -> None:
        # rank 0 carries the total so far; the other ranks restart their own count
        self.count = state["total"] if rank_and_world()[0] == 0 else 0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # Slurm: preemption/scancel/requeue, --signal=USR1@secs


class StopSignals:
    """SIGTERM / SIGUSR1 only set a flag: the step in flight (and its collectives) finishes,
    then every rank checkpoints together at the same step boundary.

    The ranks agree through dist.HostFlag (a CPU group of their own, without waiting), so every
    rank learns of a signal at the same step, one step after it arrived, and the device is never
    synchronised for it."""

    def __init__(self):
        self.received = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        self.flag = HostFlag()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """True on every rank once any rank got a stop signal (every rank calls it every step)."""
        return bool(self.flag.exchange(self.received))

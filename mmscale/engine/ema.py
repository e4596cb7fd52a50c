"""An exponential moving average of the weights (train.ema): ema = d * ema + (1 - d) * weight after
every applied optimizer step, on the device, in float32 whatever the training precision.

ZeRO 0-2 keep every weight whole on every rank, so every rank holds the same average and nothing
travels; ZeRO 3 partitions the weights and is refused (one config line). The average is state of
its own in every checkpoint (resumed exactly); `swapped_in` puts it into the model for an
evaluation or the export and puts the trained weights back afterwards, bit for bit.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.average = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.params)
        ema = [self.average[n] for n in names]
        now = [self.params[n].detach().float() for n in names]
        torch._foreach_lerp_(ema, now, 1.0 - self.decay)  # ema += (1 - d) * (now - ema)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self, enabled: bool = True):
        """The model holds the average inside the block, its own weights again after it."""
        if not enabled:
            yield
            return
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.average[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "average": dict(self.average)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.average) - set(state["average"])
        if missing:
            raise RuntimeError(f"the checkpoint's weight EMA lacks {sorted(missing)[:3]} (another model?); rerun with "
                               "the checkpoint's recipe, or train.resume=false to start over")
        for n, value in state["average"].items():
            if n in self.average:
                self.average[n].copy_(value)
        self.updates = int(state["updates"])

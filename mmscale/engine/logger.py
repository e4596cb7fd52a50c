"""What a run reports: metrics.jsonl (one JSON record per line, written by rank 0 only) and the
progress bar. Tasks receive the logger too, so nothing else writes into the run folder."""
from __future__ import annotations

import json
import os


class MetricsLogger:
    def __init__(self, path: str, rank: int):
        self.path, self.enabled = path, rank == 0

    def log(self, record: dict) -> None:
        if self.enabled:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class ProgressBar:
    """tqdm on rank 0 (nothing elsewhere)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)

    def update(self, loss: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        self.bar.close()

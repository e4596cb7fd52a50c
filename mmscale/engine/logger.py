"""What a run reports, all from rank 0 and all from the records the trainer logs:

- metrics.jsonl: one JSON record per line (steps, evaluations, events);
- TensorBoard events in <run_dir>/tensorboard: every numeric scalar of every step or evaluation
  record, tagged with its metrics.jsonl key, at the record's step, flushed at once so a live
  `tensorboard --logdir runs/` sees it (event records, e.g. `resumed`, stay in the jsonl only);
- the progress display (`ProgressDisplay`, from `MetricsLogger.progress`): on a terminal a tqdm bar that
  advances every step and shows the latest logged loss; off a terminal (a Slurm .out file, a
  redirected log) one plain line per logged step or evaluation record and nothing in between.

The display reads the records, never the device: a step that logs nothing costs nothing here.
Tasks receive the logger too, so nothing else writes into the run folder.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from numbers import Real

def scalars(record: dict) -> dict[str, float]:
    """The numeric values of a step or evaluation record, `step` aside; {} for an event record."""
    if "event" in record or "step" not in record:
        return {}
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, Real) and not isinstance(v, bool)}


class SampleLog:
    """train.sample_log: every step's sample ids on this rank, appended a line a step (each rank its
    own file, so nothing is gathered); off, it does nothing."""

    def __init__(self, path: str | None):
        self.path = path

    def write(self, step: int, ids: list) -> None:
        if self.path is None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "ids": ids}) + "\n")


class MetricsLogger:
    """metrics.jsonl (+ TensorBoard events beside it when `tensorboard` names a folder), rank 0 only."""

    def __init__(self, path: str, rank: int, tensorboard: str | None = None):
        self.path, self.enabled = path, rank == 0
        self.tensorboard_dir = tensorboard if self.enabled else None
        self._writer = None
        self._progress: ProgressDisplay | None = None

    @classmethod
    def for_run(cls, run, rank: int) -> "MetricsLogger":
        """The logger of a run folder (files.RunDir): metrics.jsonl and tensorboard/ beside it."""
        return cls(run.metrics, rank, run.tensorboard)

    def progress(self, total: int, initial: int = 0, stream=None) -> "ProgressDisplay":
        """The progress display of this run: it advances with `step()` and shows what gets logged."""
        self._progress = ProgressDisplay(total, initial, self.enabled, stream)
        return self._progress

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        values = scalars(record)
        if values and self.tensorboard_dir:
            writer = self._tensorboard()
            for tag, value in values.items():
                writer.add_scalar(tag, value, int(record["step"]))
            writer.flush()
        if self._progress is not None:
            self._progress.record(record)

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(self.tensorboard_dir)
        return self._writer

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _number(v: float) -> str:
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


class ProgressDisplay:
    """The progress display on rank 0 (nothing elsewhere). `step()` every training step (no
    device value needed), `record(r)` for each logged record (MetricsLogger.log forwards them).

    On a terminal: a tqdm bar; its postfix is the latest logged loss, evaluations print above it.
    Off a terminal: one line per logged step record, e.g.
        train step 120/440 (27%) loss 3.9121 lr 9.01e-04 samples/s 251.3 elapsed 00:31 eta 01:24
    and one per evaluation record (`eval step 120/440 zeroshot/top1 0.41 ...`); nothing else."""

    def __init__(self, total: int, initial: int, enabled: bool, stream=None):
        self.total, self.step_count, self.enabled = total, initial, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start_step, self.start = initial, time.perf_counter()
        self.tty = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=self.stream)

    def step(self, n: int = 1) -> None:
        self.step_count += n
        if self.bar is not None:
            self.bar.update(n)

    def eta(self) -> float:
        """Seconds left at the mean pace since this display started (evaluations included)."""
        done = self.step_count - self.start_step
        if done <= 0:
            return math.inf
        return (time.perf_counter() - self.start) / done * max(self.total - self.step_count, 0)

    def record(self, record: dict) -> None:
        if not self.enabled or "event" in record or "step" not in record:
            return
        line = self.line(record)
        if self.bar is None:
            self.stream.write(line + "\n")
            self.stream.flush()
        elif line.startswith("train "):
            extra = {"nonfinite": record["nonfinite_steps"]} if record.get("nonfinite_steps") else {}
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", **extra)
        else:  # an evaluation: a line above the bar
            self.bar.write(line, file=self.stream)

    def line(self, record: dict) -> str:
        step = int(record["step"])
        where = f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"
        if "loss" in record and "lr" in record:  # a training step record (evaluations log neither)
            parts = [f"train {where}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
            if "samples_per_s" in record:
                parts.append(f"samples/s {record['samples_per_s']:.1f}")
            if record.get("nonfinite_steps"):  # steps skipped for non-finite gradients, in all
                parts.append(f"nonfinite {record['nonfinite_steps']}")
            parts.append(f"elapsed {_duration(time.perf_counter() - self.start)}")
            parts.append(f"eta {_duration(self.eta())}")
            return " ".join(parts)
        return " ".join([f"eval {where}"] + [f"{k} {_number(v)}" for k, v in scalars(record).items()])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


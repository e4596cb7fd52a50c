"""Files that must never be seen half-written, and the layout of a run folder.

Everything mmscale writes that a later process reads (checkpoint pointers, configs, exports,
feature caches, results) goes through `atomic_write`: the bytes land in a temporary file in the
same folder, are flushed to disk, and replace the target in one rename. A crash leaves either
the old file or the new one, never a torn one. Imports nothing from mmscale.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path next to `path`; on success it replaces `path` in one rename.
    For writers that want a file name (safetensors, torch.save) rather than a file object."""
    path = str(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def atomic_write_json(path: str, obj, indent: int | None = 2) -> None:
    atomic_write(path, json.dumps(obj, indent=indent) + "\n")


LATEST = "latest"  # in a checkpoints folder: names the newest complete checkpoint (DeepSpeed reads it too)


@dataclass(frozen=True)
class RunDir:
    """What a run folder (train.run_dir) holds; the engine writes it, tools read it."""
    root: str

    @property
    def config(self) -> str:  # the resolved recipe: rebuilds the run's model
        return os.path.join(self.root, "config.yaml")

    @property
    def metrics(self) -> str:  # one JSON record per line: steps, evaluations, events
        return os.path.join(self.root, "metrics.jsonl")

    @property
    def checkpoints(self) -> str:  # DeepSpeed checkpoints step<N>/ and the `latest` pointer
        return os.path.join(self.root, "checkpoints")

    @property
    def latest(self) -> str:
        return os.path.join(self.checkpoints, LATEST)

    @property
    def export(self) -> str:  # model.safetensors + config.yaml (+ text towers' tokenizers)
        return os.path.join(self.root, "export")

    @property
    def results(self) -> str:
        return os.path.join(self.root, "results.json")

    @property
    def features(self) -> str:  # CBMF's frozen-tower feature cache (data.feature_cache puts it elsewhere)
        return os.path.join(self.root, "features")

    def samples(self, rank: int) -> str:  # train.sample_log: each step's sample ids on this rank
        return os.path.join(self.root, "samples", f"rank{rank}.jsonl")

    @property
    def tensorboard(self) -> str:  # the events of every logged scalar: tensorboard --logdir runs/
        return os.path.join(self.root, "tensorboard")

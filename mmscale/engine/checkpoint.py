"""Checkpoints: DeepSpeed's (model, optimizer, LR scheduler) plus the state of every object
registered with the Checkpointer, so a new piece of training state is one `register` call.

Writing is all-or-nothing: every rank writes its part of step<N>/, then rank 0 moves `latest`
to it in one atomic rename. A kill before that leaves the previous checkpoint in charge.
"""
from __future__ import annotations

import os
import shutil

from ..dist import barrier, rank_and_world
from ..files import RunDir, atomic_write


class Checkpointer:
    def __init__(self, run: RunDir, engine, keep: int):
        self.run, self.engine, self.keep = run, engine, keep
        self.state: dict = {}  # name -> object with state_dict() / load_state_dict()
        self.last_tag = None  # the checkpoint this process last wrote or read

    def register(self, name: str, obj) -> None:
        self.state[name] = obj

    def save(self, step: int) -> None:
        """Every rank calls it (state_dict() may be a collective, e.g. a count summed over ranks)."""
        tag = f"step{step:08d}"
        if tag == self.last_tag:  # e.g. a stop signal right after a periodic checkpoint
            return
        client = {name: obj.state_dict() for name, obj in self.state.items()}
        self.engine.save_checkpoint(self.run.checkpoints, tag=tag, save_latest=False, client_state=client)
        barrier()
        if rank_and_world()[0] == 0:
            atomic_write(self.run.latest, tag)
            tags = sorted(d for d in os.listdir(self.run.checkpoints) if d.startswith("step") and d != tag)
            for old in tags[:max(0, len(tags) - (self.keep - 1))]:
                shutil.rmtree(os.path.join(self.run.checkpoints, old), ignore_errors=True)
        barrier()
        self.last_tag = tag

    def resume(self) -> str | None:
        """Loads `latest` if there is one: the engine's state and every registered object's.
        Returns the checkpoint's path, or None when there is nothing to resume."""
        if not os.path.isfile(self.run.latest):
            return None
        path, client = self.engine.load_checkpoint(self.run.checkpoints)
        if path is None:
            return None
        for name, obj in self.state.items():
            if name not in client:
                raise RuntimeError(f"{path}: the checkpoint has no {name!r} state (written by another mmscale "
                                   f"version?); rerun with train.resume=false to start over")
            obj.load_state_dict(client[name])
        with open(self.run.latest) as f:
            self.last_tag = f.read().strip()
        return path

"""Checkpoints: DeepSpeed's (model, optimizer, LR scheduler) plus the state of every object
registered with the Checkpointer, so a new piece of training state is one `register` call.

Writing is all-or-nothing: every rank writes its part of step<N>/, then rank 0 moves `latest`
to it in one atomic rename. A kill before that leaves the previous checkpoint in charge.

Resuming on another number of ranks: ZeRO 1-3 partition the optimizer state by rank, and
DeepSpeed refuses to load a checkpoint written by a different data-parallel world. Before
DeepSpeed starts, `prepare_resume` notices the difference and rank 0 converts the checkpoint to
DeepSpeed's universal format (world-size free, deepspeed.checkpoint.ds_to_universal) next to it;
the engine then starts with `checkpoint.load_universal` and loads that. ZeRO 0 checkpoints hold
the whole optimizer state and load on any world as they are.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from ..dist import barrier, broadcast_object, rank_and_world
from ..files import RunDir, atomic_write
from .backend import base_optimizer, place_optimizer_state

TAG = re.compile(r"step\d+$")
UNIVERSAL = ".universal"  # suffix of a converted copy of a checkpoint (removed at the next save)


def saved_world(folder: str) -> int | None:
    """How many data-parallel ranks wrote the checkpoint in `folder`, from its per-rank ZeRO
    optimizer files; None for ZeRO 0, whose files do not depend on it."""
    return len(glob.glob(os.path.join(folder, "zero_pp_rank_*_mp_rank_*_optim_states.pt"))) or None


def to_universal(folder: str) -> str:
    """Converts a ZeRO checkpoint folder to DeepSpeed's universal format in folder + UNIVERSAL
    (written under a temporary name, renamed when complete); returns that folder."""
    from types import SimpleNamespace
    from deepspeed.checkpoint.ds_to_universal import main as convert
    out = folder + UNIVERSAL
    if os.path.isdir(out):
        return out
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # inject_missing_state: our models carry no universal_checkpoint_info (no tensor parallelism
    # to describe); the converter then assumes plain data parallelism, which is what we run
    convert(SimpleNamespace(input_folder=folder, output_folder=tmp, num_extract_workers=1, num_merge_workers=1,
                            keep_temp_folder=False, strict=True, inject_missing_state=True))
    os.replace(tmp, out)
    return out


class Checkpointer:
    def __init__(self, run: RunDir, keep: int):
        self.run, self.keep = run, keep
        self.engine = None  # set by attach(), once DeepSpeed has started
        self.state: dict = {}  # name -> object with state_dict() / load_state_dict()
        self.last_tag = None  # the checkpoint this process last wrote or read
        self.load_tag = None  # what resume() loads: latest, or its universal conversion

    def register(self, name: str, obj) -> None:
        self.state[name] = obj

    def attach(self, engine) -> None:
        self.engine = engine

    def latest(self) -> str | None:
        if not os.path.isfile(self.run.latest):
            return None
        with open(self.run.latest) as f:
            return f.read().strip()

    def prepare_resume(self, world: int) -> bool:
        """Before DeepSpeed starts (every rank calls it): if `latest` was written by another number
        of ranks, convert it to the universal format. True if the engine must load universal."""
        tag = self.latest()
        if tag is None:
            return False
        folder = os.path.join(self.run.checkpoints, tag)
        saved = saved_world(folder)
        self.load_tag = tag
        if saved is None or saved == world:
            return False
        error = None
        if rank_and_world()[0] == 0:
            print(f"mmscale: {folder} was written by {saved} ranks, this run has {world}: converting it to "
                  f"DeepSpeed's universal checkpoint", file=sys.stderr, flush=True)
            try:
                to_universal(folder)
            except Exception as e:  # every rank must hear of it, or the others wait at the barrier
                error = f"{type(e).__name__}: {e}"
        error = broadcast_object(error)
        if error:
            raise RuntimeError(f"{folder}: cannot resume a {saved}-rank ZeRO checkpoint on {world} ranks: "
                               f"DeepSpeed's universal conversion failed ({error}); rerun on {saved} ranks")
        self.load_tag = tag + UNIVERSAL
        return True

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
            names = sorted(d for d in os.listdir(self.run.checkpoints) if d != tag)
            tags = [d for d in names if TAG.match(d)]
            # older checkpoints past train.keep_checkpoints, and what a universal resume left
            # (the converted copy, DeepSpeed's latest_universal pointer)
            for name in tags[:max(0, len(tags) - (self.keep - 1))] + [d for d in names if "universal" in d]:
                path = os.path.join(self.run.checkpoints, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        barrier()
        self.last_tag = tag

    def resume(self) -> str | None:
        """Loads `latest` (or the universal copy prepare_resume made of it): the engine's state and
        every registered object's. Returns the checkpoint's path, or None when there is none."""
        tag = self.load_tag or self.latest()
        if tag is None:
            return None
        path, client = self.engine.load_checkpoint(self.run.checkpoints, tag=tag)
        if path is None:
            return None
        place_optimizer_state(base_optimizer(self.engine))
        for name, obj in self.state.items():
            if name not in client:
                raise RuntimeError(f"{path}: the checkpoint has no {name!r} state (written by another mmscale "
                                   f"version?); rerun with train.resume=false to start over")
            obj.load_state_dict(client[name])
        self.last_tag = tag.removesuffix(UNIVERSAL)
        return path

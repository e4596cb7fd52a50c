"""Checkpoints: DeepSpeed's (model, optimizer, LR scheduler) plus the state of every object
registered with the Checkpointer, so a new piece of training state is one `register` call.

Writing is all-or-nothing: every rank writes its part of step<N>/, then rank 0 moves `latest`
to it in one atomic rename. A kill before that leaves the previous checkpoint in charge.

Every checkpoint folder ends with a manifest (manifest.json: every file's size and sha256, the
step, the world size), written by rank 0 after a barrier, atomically, before `latest` moves; a
folder without one is not complete. Resume checks `latest` against its manifest (each rank
hashes a share of the files) and, if it fails, falls back to the next newest intact checkpoint
with one line naming what was wrong; none intact is a CheckpointError (exit 2). A save that
fails (no space, permission, an I/O error) on any rank removes its folder, leaves `latest` as it
was and is a CheckpointError (exit 74), or with train.on_checkpoint_error=continue one line and
the next checkpoint tries again. DeepSpeed's writes are caught where they happen, so every rank
still walks through the save's collectives and all agree on the outcome.

Resuming on another number of ranks: ZeRO 1-3 partition the optimizer state by rank, and
DeepSpeed refuses to load a checkpoint written by a different data-parallel world. Before
DeepSpeed starts, `prepare_resume` notices the difference and rank 0 converts the checkpoint to
DeepSpeed's universal format (world-size free, deepspeed.checkpoint.ds_to_universal) next to it;
the engine then starts with `checkpoint.load_universal` and loads that. ZeRO 0 checkpoints hold
the whole optimizer state and load on any world as they are.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import sys

from ..dist import all_gather_object, any_rank, barrier, broadcast_object, on_rank0, rank_and_world
from ..files import RunDir, atomic_write, atomic_write_json
from .backend import base_optimizer, place_optimizer_state

TAG = re.compile(r"step\d+$")
UNIVERSAL = ".universal"  # suffix of a converted copy of a checkpoint (removed at the next save)
MANIFEST = "manifest.json"  # in a checkpoint folder, written last: what makes it complete
IO_ERROR_EXIT = 74  # EX_IOERR: a checkpoint could not be written
NO_CHECKPOINT_EXIT = 2


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or none can be resumed from: one line for the user."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    """The files of a checkpoint folder (relative paths, sorted), the manifest left out."""
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in names]
    return sorted(f for f in out if f != MANIFEST)


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".strip().rstrip(":")


def _free(path: str) -> str:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        free = shutil.disk_usage(path or ".").free
    except OSError:
        return "unknown free space"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024


def write_manifest(folder: str, step: int) -> None:
    """Every rank hashes its share of the folder's files; rank 0 writes the manifest (atomically)
    once all are done. A collective: raises OSError on every rank if any rank failed."""
    rank, world = rank_and_world()
    files = _files(folder)
    mine, error = {}, None
    try:
        for f in files[rank::world]:
            path = os.path.join(folder, f)
            mine[f] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    except OSError as e:
        error = _describe(e)
    parts = all_gather_object((mine, error))
    errors = [e for _, e in parts if e]
    if not errors and rank == 0:
        entries = {f: e for part, _ in parts for f, e in part.items()}
        try:
            atomic_write_json(os.path.join(folder, MANIFEST),
                              {"step": step, "world_size": world, "files": dict(sorted(entries.items()))})
        except OSError as e:
            errors.append(_describe(e))
    errors = broadcast_object(errors)
    if errors:
        raise OSError(errors[0])


def manifest_problem(folder: str) -> str | None:
    """What is wrong with a checkpoint folder against its manifest (None: intact). A collective:
    each rank checks a share of the files, every rank gets the same answer."""
    rank, world = rank_and_world()
    path = os.path.join(folder, MANIFEST)
    problem, files = None, {}
    if not os.path.isdir(folder):
        problem = "the folder is missing"
    elif not os.path.isfile(path):
        problem = "no manifest (the save did not complete)"
    else:
        try:
            with open(path) as f:
                manifest = json.load(f)
            files = manifest["files"]
            tag_step = os.path.basename(folder).removeprefix("step")
            if tag_step.isdigit() and int(manifest["step"]) != int(tag_step):
                problem = f"its manifest is for step {manifest['step']}"
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"unreadable manifest ({_describe(e)})"
    mine = None
    if problem is None:
        for name in sorted(files)[rank::world]:
            want, p = files[name], os.path.join(folder, name)
            try:
                if not os.path.isfile(p):
                    mine = f"{name} is missing"
                elif (size := os.path.getsize(p)) != want["size"]:
                    mine = f"{name} is {size} bytes, the manifest says {want['size']}"
                elif _sha256(p) != want["sha256"]:
                    mine = f"{name} does not match its checksum"
            except OSError as e:
                mine = f"{name} is unreadable ({_describe(e)})"
            if mine:
                break
    found = [m for m in all_gather_object(mine) if m]
    return problem or (found[0] if found else None)


@contextlib.contextmanager
def caught_writes(engine):
    """DeepSpeed's checkpoint writes record their first error instead of raising it: a rank that
    raised half-way through save_checkpoint would skip its last barrier and leave the others
    waiting there (while it waited in ours: a hang, not a timeout). The writes are the checkpoint
    engine's makedirs and save, and the copy of zero_to_fp32.py into the checkpoint folder that
    rank 0 makes alone, outside that engine (the first write to fail on a full disk, since it comes
    last). Yields the list the errors land in."""
    errors: list = []
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        yield errors
        return

    def guard(write):
        def guarded(*args, **kwargs):
            if errors:
                return None
            try:
                return write(*args, **kwargs)
            except OSError as e:
                errors.append(e)
            except RuntimeError as e:  # torch.save: inline_container's RuntimeError carries no errno
                path = kwargs.get("path", args[-1] if args else "")
                try:
                    left = shutil.disk_usage(os.path.dirname(str(path)) or ".").free
                except (OSError, TypeError):
                    left = None
                errors.append(OSError(errno.ENOSPC, f"No space left on device (torch.save: {_describe(e)})")
                              if left is not None and left < 1 << 20 else e)
        return guarded

    writers = [(ce, name) for name in ("save", "makedirs") if hasattr(ce, name)]
    writers += [(engine, "_copy_recovery_script")] if hasattr(engine, "_copy_recovery_script") else []
    for owner, name in writers:
        setattr(owner, name, guard(getattr(owner, name)))
    try:
        yield errors
    finally:
        for owner, name in writers:
            owner.__dict__.pop(name, None)


def saved_world(folder: str) -> int | None:
    """How many data-parallel ranks wrote the checkpoint in `folder`, from its per-rank ZeRO
    optimizer files (bf16_zero_pp_rank_* from ZeRO 1's BF16_Optimizer under bf16); None for ZeRO 0,
    whose files do not depend on it."""
    return len(glob.glob(os.path.join(folder, "*zero_pp_rank_*_mp_rank_*_optim_states.pt"))) or None


def to_universal(folder: str) -> str:
    """Converts a ZeRO checkpoint folder to DeepSpeed's universal format in folder + UNIVERSAL
    (written under a temporary name, renamed when complete); returns that folder. A conversion
    that was killed left only its temporary folder, which is removed: this one starts over and,
    as nothing times it out (on_rank0), finishes."""
    from types import SimpleNamespace
    from deepspeed.checkpoint.ds_to_universal import main as convert
    out = folder + UNIVERSAL
    if os.path.isdir(out):
        return out
    for stale in glob.glob(glob.escape(out) + ".tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{out}.tmp{os.getpid()}"
    # inject_missing_state: our models carry no universal_checkpoint_info (no tensor parallelism
    # to describe); the converter then assumes plain data parallelism, which is what we run
    convert(SimpleNamespace(input_folder=folder, output_folder=tmp, num_extract_workers=1, num_merge_workers=1,
                            keep_temp_folder=False, strict=True, inject_missing_state=True))
    os.replace(tmp, out)
    return out


def convert_once(folder: str, saved: int, world: int) -> str:
    """to_universal with its one line (rank 0's part of prepare_resume)."""
    print(f"mmscale: {folder} was written by {saved} ranks, this run has {world}: converting it to "
          f"DeepSpeed's universal checkpoint", file=sys.stderr, flush=True)
    return to_universal(folder)


class Checkpointer:
    def __init__(self, run: RunDir, keep: int, on_error: str = "exit"):
        self.run, self.keep, self.on_error = run, keep, on_error
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

    def prepare_resume(self, world: int, zero_stage: int = 0, groups: int = 1) -> bool:
        """Before DeepSpeed starts (every rank calls it): if `latest` was written by another number
        of ranks, convert it to the universal format. True if the engine must load universal.
        The checkpoint is `latest` if it is intact, else the next newest intact one."""
        tag = self.intact()
        if tag is None:
            return False
        folder = os.path.join(self.run.checkpoints, tag)
        saved = saved_world(folder)
        self.load_tag = tag
        if saved is None or saved == world:
            return False
        if zero_stage == 3 and groups > 1:
            # DeepSpeed 0.19.8's universal loading under ZeRO 3 gives every group the first one's
            # settings (repaired by GroupSettings) and its optimizer moments come back wrong with
            # several groups: the losses leave the uninterrupted run's from the first update on
            raise CheckpointError(
                f"{folder} was written by {saved} ranks, this run has {world}: a ZeRO-3 checkpoint with {groups} "
                f"parameter groups (optim.weight_decay with decay_exclusions, layer_decay, lr_mult) does not resume "
                f"exactly on another number of ranks with DeepSpeed's universal checkpoint; rerun on {saved} ranks",
                NO_CHECKPOINT_EXIT)
        try:  # on rank 0, however long it takes: the others wait without a collective timeout
            on_rank0(convert_once, folder, saved, world)
        except Exception as e:  # noqa: BLE001 - on every rank (on_rank0 tells them all)
            raise RuntimeError(f"{folder}: cannot resume a {saved}-rank ZeRO checkpoint on {world} ranks: "
                               f"DeepSpeed's universal conversion failed ({e}); rerun on {saved} ranks") from e
        self.load_tag = tag + UNIVERSAL
        return True

    def intact(self) -> str | None:
        """`latest` if it matches its manifest, else the newest older checkpoint that does (one line
        names what was wrong); None when there is no `latest`. Every rank calls it."""
        latest = self.latest()
        if latest is None:
            return None
        root = self.run.checkpoints
        older = sorted((d for d in os.listdir(root) if TAG.match(d) and d < latest), reverse=True)
        problems = []
        for tag in [latest] + older:
            problem = manifest_problem(os.path.join(root, tag))
            if problem is None:
                if problems and rank_and_world()[0] == 0:
                    print(f"mmscale: {'; '.join(problems)}: resuming from checkpoints/{tag} instead",
                          file=sys.stderr, flush=True)
                return tag
            problems.append(f"checkpoints/{tag}: {problem}")
        raise CheckpointError(f"no intact checkpoint in {root} ({'; '.join(problems)}): rerun with "
                              f"train.resume=false to start over (or move {root} away)", NO_CHECKPOINT_EXIT)

    def save(self, step: int, final: bool = False) -> bool:
        """Every rank calls it (state_dict() may be a collective, e.g. a count summed over ranks).
        False if the save failed and train.on_checkpoint_error=continue let training go on (never
        for the final save: no later checkpoint would retry)."""
        tag = f"step{step:08d}"
        if tag == self.last_tag:  # e.g. a stop signal right after a periodic checkpoint
            return True
        client = {name: obj.state_dict() for name, obj in self.state.items()}
        folder = os.path.join(self.run.checkpoints, tag)
        rank = rank_and_world()[0]
        if rank == 0 and os.path.isdir(folder):  # a corrupt one resume passed over: start it afresh
            shutil.rmtree(folder, ignore_errors=True)
        error = None
        with caught_writes(self.engine) as caught:
            try:
                self.engine.save_checkpoint(self.run.checkpoints, tag=tag, save_latest=False, client_state=client)
            except (OSError, RuntimeError) as e:
                error = e
        error = error or (caught[0] if caught else None)
        if not any_rank(error is not None):
            try:
                write_manifest(folder, step)
                if rank == 0:
                    atomic_write(self.run.latest, tag)
            except OSError as e:
                error = e
        errors = [e for e in all_gather_object(_describe(error) if error else None) if e]
        if errors:
            return self._failed(step, folder, errors[0], final)
        barrier()
        on_rank0(self._remove_old, tag)  # removing GBs from a slow file system may take a while
        self.last_tag = tag
        return True

    def _remove_old(self, tag: str) -> None:
        """Older checkpoints past train.keep_checkpoints, and what a universal resume left (the
        converted copy, DeepSpeed's latest_universal pointer)."""
        names = sorted(d for d in os.listdir(self.run.checkpoints) if d != tag)
        tags = [d for d in names if TAG.match(d)]
        for name in tags[:max(0, len(tags) - (self.keep - 1))] + [d for d in names if "universal" in d]:
            path = os.path.join(self.run.checkpoints, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)

    def _failed(self, step: int, folder: str, error: str, final: bool) -> bool:
        """A save failed on some rank: no partial folder, `latest` untouched, one line."""
        if rank_and_world()[0] == 0:
            shutil.rmtree(folder, ignore_errors=True)
        barrier()
        line = (f"checkpoint at step {step} not saved ({error}; {_free(self.run.checkpoints)} in "
                f"{self.run.checkpoints}); checkpoints/latest stays {self.latest() or 'none'}")
        if self.on_error == "continue" and not final:
            if rank_and_world()[0] == 0:
                print(f"mmscale: {line}; training on, the next checkpoint tries again", file=sys.stderr, flush=True)
            return False
        raise CheckpointError(f"{line}: free space (or fix the folder), then rerun to continue", IO_ERROR_EXIT)

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

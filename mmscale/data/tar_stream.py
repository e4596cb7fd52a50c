"""Streamed WebDataset shards (data.type: webdataset) that resume exactly.

For data too large or too remote to index, samples come from reading tar shards front to back.
Three things make the stream a pure function of (seed, shard list, ranks x loader workers):

- The shard order: one seeded permutation of the shard list after another (a pass each), laid
  end to end. There are S = ranks x max(1, workers) streams ("slots"); slot j reads shards
  j, j + S, j + 2S, ... of that order (from `base`, which moves only on a re-split). Any number
  of shards works with any S: a slot simply reaches into the next pass.
- The shuffle buffer: each slot keeps `shuffle_buffer` samples and swaps a pick for each
  sample read; the pick is a counter-based hash (splitmix64 of the slot and the draw number),
  so its whole state is a counter.
- The augmentation is seeded by the sample's place in the shard order (shard number, offset).

A slot's position is then (its shard number k, samples read of that shard, draws made, and
which samples (k, offset) sit in the buffer, in order). The loader worker sends the position
after each batch with the batch; the stream keeps the latest one per slot and the checkpoint
holds every rank's (gathered: a collective). Resuming on the same ranks and workers, each slot
re-reads (without decoding) the shards its buffered samples came from to refill the buffer,
skips to its offset and goes on: the batches are the uninterrupted run's. On another number of
ranks or workers the positions of S slots have no counterpart among S' slots: the stream
restarts at the oldest shard any buffer still held, re-split over the new slots, with one line
saying so (no sample of the order is skipped; some already trained on come again).
"""
from __future__ import annotations

import io
import os
import sys

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import ConfigError
from ..dist import all_gather_object, rank_and_world
from ..seeds import seed_for, seed_torch, torch_generator
from .images import brief_error, stable_id
from .batches import _Position, ignore_stop_signals

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ShardOrder:
    """The shards laid out pass after pass, each pass a permutation seeded by (seed, pass)."""

    def __init__(self, urls: str | list[str], seed: int):
        from webdataset.shardlists import expand_urls
        self.urls = list(urls) if isinstance(urls, list) else expand_urls(urls)
        if not self.urls:
            raise ConfigError(f"data.shards: {urls!r} names no shard")
        self.seed, self._pass = seed, (None, None)

    def __len__(self):
        return len(self.urls)

    def __getitem__(self, g: int) -> str:
        p, i = divmod(g, len(self.urls))
        if self._pass[0] != p:
            gen = torch_generator("shard_pass", self.seed, p)
            self._pass = (p, torch.randperm(len(self.urls), generator=gen).tolist())
        return self.urls[self._pass[1][i]]


def start_position() -> dict:
    return {"shard": 0, "offset": 0, "draws": 0, "buffer": []}


class SlotReader:
    """One slot's samples: its shards in order, through the shuffle buffer, decoded and
    transformed, in local batches, each with the slot's position after it."""

    def __init__(self, stream: "ShardStream", slot: int):
        self.order, self.slot, self.slots, self.base = stream.order, slot, stream.slots, stream.base
        self.seed, self.size, self.transform = stream.seed, stream.shuffle_buffer, stream.transform
        self.collate, self.local_batch = stream.collate, stream.local_batch
        pos = stream.positions.get(slot, start_position())
        self.cursor = (pos["shard"], pos["offset"])  # the next sample to read
        self.draws, self.refs = pos["draws"], [tuple(r) for r in pos["buffer"]]

    def place(self, k: int) -> int:
        """Where this slot's shard k is in the shard order."""
        return self.base + self.slot + k * self.slots

    def _shard(self, k: int):
        """(offset, sample) of shard k, front to back; a tar that breaks ends early with a warning
        (the same on every read of the same file, so positions stay valid)."""
        import webdataset as wds
        from webdataset.tariterators import tarfile_samples
        url = self.order[self.place(k)]
        return enumerate(tarfile_samples([{"url": url}], handler=wds.warn_and_continue))

    def _read(self, k: int, start: int):
        """(ref, sample) from sample `start` of shard k on, endlessly."""
        empty = 0
        while True:
            n = 0
            for off, sample in self._shard(k):
                n += 1
                if off >= start:
                    self.cursor = (k, off + 1)
                    yield (k, off), sample
            empty = 0 if n else empty + 1
            # a slot sees every shard of the order about once per n of its own: 32 n empty ones
            # in a row (by chance e^-32 when one shard holds a sample) means none does
            if empty >= 32 * len(self.order):
                raise ConfigError(f"data.shards: none of the {len(self.order)} shards holds a sample "
                                  f"({empty} read in a row, the last {self.order[self.place(k)]})")
            k, start = k + 1, 0

    def samples(self):
        """(ref, sample) out of the shuffle buffer: once it is full, each sample read takes the
        place of a pick, which comes out. A resumed slot first reads again (without decoding)
        from the oldest shard its buffer held up to its position, keeping the buffered samples."""
        resume_at, want, got = self.cursor, set(self.refs), {}
        buffer = None if want else []
        start = (min(r[0] for r in want), 0) if want else resume_at
        for item in self._read(*start):
            if buffer is None:
                if item[0] < resume_at:
                    if item[0] in want:
                        got[item[0]] = item
                    continue
                buffer = self._rebuilt(got)
            if self.size == 0:
                yield item
                continue
            if len(buffer) < self.size:
                buffer.append(item)
                self.refs.append(item[0])
                continue
            i = seed_for("buffer_pick", self.seed, self.slot + self.base, self.draws) % len(buffer)
            out, buffer[i], self.refs[i] = buffer[i], item, item[0]
            self.draws += 1
            yield out

    def _rebuilt(self, got: dict) -> list:
        """The buffer as the checkpoint left it, from the samples read again."""
        missing = [r for r in self.refs if r not in got]
        if missing:
            k, off = missing[0]
            raise ConfigError(f"data.shards: resuming the stream: {self.order[self.place(k)]} no longer holds sample "
                              f"{off} (the shards changed since the checkpoint); rerun with train.resume=false")
        return [got[r] for r in self.refs]

    def position(self) -> dict:
        return {"shard": self.cursor[0], "offset": self.cursor[1], "draws": self.draws, "buffer": list(self.refs)}

    def decode(self, ref, sample) -> tuple:
        image_key = next((e for e in IMAGE_EXTS if e in sample), None)
        if image_key is None or "txt" not in sample:
            raise ValueError("no image or no .txt")
        image = Image.open(io.BytesIO(sample[image_key]))
        image.load()
        with torch.random.fork_rng(devices=[]):  # the augmentation of this sample wherever it is read
            seed_torch("stream_augment", self.seed, self.place(ref[0]), ref[1])
            # the bytes identify the image (loss.positives: image)
            return self.transform(image), sample["txt"].decode("utf-8").strip(), stable_id(sample[image_key])

    def batches(self):
        """Local batches; an undecodable sample is skipped and counted (data.max_unreadable bounds the
        share); the first one of each shard is named in one line, the others only counted."""
        items, ids, skipped, named = [], [], 0, set()
        for ref, sample in self.samples():
            name = f"{os.path.basename(sample.get('__url__', '?'))}/{sample.get('__key__')}"
            try:
                image, caption, image_id = self.decode(ref, sample)
            except (OSError, ValueError) as e:  # PIL raises OSError subclasses for corrupt files
                if sample.get("__url__") not in named:  # a shard whose images do not decode: one line, not one each
                    named.add(sample.get("__url__"))
                    print(f"mmscale: data.shards: {name} does not decode ({brief_error(e)}): skipped; this shard's "
                          f"undecodable samples are skipped without a line, counted in skipped_samples",
                          file=sys.stderr, flush=True)
                skipped += 1
                continue
            items.append((image, caption, -1, skipped, image_id))
            ids.append(name)
            skipped = 0
            if len(items) == self.local_batch:
                batch = self.collate(items)
                batch.update(_slot=self.slot, _position=self.position(), _ids=ids)
                yield batch
                items, ids = [], []


class _Slots(IterableDataset):
    """What a loader iterates: worker i (the main process without workers) runs slots[i]."""

    def __init__(self, stream: "ShardStream", slots: list[int]):
        self.stream, self.slots = stream, slots

    def __iter__(self):
        info = get_worker_info()
        return SlotReader(self.stream, self.slots[info.id if info else 0]).batches()


class ShardStream(_Position):
    """Streams WebDataset shards (tools/build_shards.py output, or any tars) for training, resuming
    exactly (module docstring). Steps per epoch come from data.num_samples, so the LR schedule is
    right; an epoch is that many samples, not a pass over the shards."""

    def __init__(self, urls, num_samples: int, transform, collate, global_batch: int, rank: int,
                 world: int, seed: int = 0, num_workers: int = 0, shuffle_buffer: int = 5000):
        self.order = ShardOrder(urls, seed)
        self.transform, self.collate = transform, collate
        self.global_batch, self.local_batch, self.rank, self.world = global_batch, global_batch // world, rank, world
        self.seed, self.num_workers, self.shuffle_buffer = seed, num_workers, shuffle_buffer
        self.workers = max(1, num_workers)  # streams per rank
        self.slots = world * self.workers
        self.base = 0  # where slot 0's first shard is in the order (moves on a re-split)
        self.positions: dict[int, dict] = {}  # this rank's slots: the position after their latest batch
        self.turn = 0  # which of this rank's slots the next batch comes from (the loader's round robin)
        self.last_ids: list[str] = []  # the batch just yielded: "<shard file>/<sample key>" each
        self.steps_per_epoch = num_samples // global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.num_samples: {num_samples} is smaller than one global batch ({global_batch})")

    def state_dict(self) -> dict:
        """Every rank's slot positions (a collective: every rank calls it, each gets them all)."""
        positions = {}
        for part in all_gather_object(self.positions):
            positions.update(part)
        return {**super().state_dict(), "world": self.world, "workers": self.workers, "base": self.base,
                "turn": self.turn, "positions": {str(j): p for j, p in sorted(positions.items())}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        positions = {int(j): p for j, p in state.get("positions", {}).items()}
        world, workers = state.get("world"), state.get("workers")
        if (world, workers) == (self.world, self.workers):
            self.base, self.turn = state["base"], state["turn"]
            mine = range(self.rank * self.workers, (self.rank + 1) * self.workers)
            self.positions = {j: p for j, p in positions.items() if j in mine}
            return
        # S slots' positions do not map onto S': restart at the oldest shard any slot still needs
        # (its buffered samples' or the one it is reading), the order from there re-split
        old_slots, old_base = (world or 1) * (workers or 1), state.get("base", 0)
        oldest = [old_base + j + min([p["shard"]] + [r[0] for r in p["buffer"]]) * old_slots
                  for j, p in positions.items()]
        unread = [old_base + j for j in range(old_slots) if j not in positions]  # slots that made no batch yet
        self.base = min(oldest + unread) if world is not None else 0
        self.positions, self.turn = {}, 0
        if rank_and_world()[0] == 0:
            was = (f"the checkpoint streamed on {world} ranks x {workers} loader workers" if world is not None
                   else "the checkpoint holds no stream positions (an older mmscale)")
            print(f"mmscale: data.type webdataset: {was}, this run has {self.world} x {self.workers}: the stream "
                  f"restarts at shard {self.base} of the shard order (the oldest one a shuffle buffer still held), "
                  f"split over {self.slots} streams; nothing from there on is skipped, and samples already trained "
                  f"on from those shards come again (resume on {world} x {workers} for the exact stream)"
                  if world is not None else
                  f"mmscale: data.type webdataset: {was}: the stream starts at the first shard of the order",
                  file=sys.stderr, flush=True)

    def __iter__(self):
        w = self.workers
        # worker i plays this rank's slot (turn + i) % w: the loader's first batch comes from
        # worker 0, and it must be the slot whose turn it is
        slots = [self.rank * w + (self.turn + i) % w for i in range(w)]
        loader = DataLoader(_Slots(self, slots), batch_size=None, num_workers=self.num_workers,
                            worker_init_fn=ignore_stop_signals, pin_memory=torch.cuda.is_available())
        for batch in loader:
            self.positions[int(batch.pop("_slot"))] = batch.pop("_position")
            self.last_ids = batch.pop("_ids")
            self.turn = (self.turn + 1) % w
            self._advance()
            yield batch

"""Batches for training: collation, and the two rank-sharded streams the engine iterates.

BatchStream is a pure function of (seed, epoch, step): each epoch is one seeded permutation cut
into global batches, rank r takes its slice of each. Its state is (epoch, step), so a resumed run
sees exactly the batches the uninterrupted run would have seen; weighted sources (data.sources,
mixture.py) replace the permutation with another pure function of the epoch. ShardStream (tar_stream.py)
reads WebDataset shards front to back for data too large to index, and resumes exactly too.
"""
from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError
from ..seeds import torch_generator
from .images import normalize_images, stable_id


class Collate:
    """(image, caption, label, skipped, image_id) items -> {"label", "skipped", image_key: images,
    the tokenized captions as <text_prefix>input_ids / <text_prefix>attention_mask, and the
    positives keys (loss.positives) "image_id" and "caption_id" (a hash of the caption text)}.
    image_key None leaves the images out, text_prefix None the captions and their ids (tokenize
    is then not needed)."""

    def __init__(self, tokenize=None, image_key: str | None = "image", text_prefix: str | None = ""):
        self.tokenize, self.image_key, self.text_prefix = tokenize, image_key, text_prefix

    def __call__(self, items) -> dict:
        images, captions, labels, skipped, image_ids = zip(*items)
        batch = {"label": torch.tensor(labels), "skipped": sum(skipped),  # a count for the log, not a tensor
                 "image_id": torch.tensor(image_ids, dtype=torch.int64)}
        if self.image_key is not None:
            batch[self.image_key] = torch.stack(images)
        if self.text_prefix is not None:
            batch.update({self.text_prefix + k: v for k, v in self.tokenize(list(captions)).items()})
            # the text the tokenizer sees: runs of whitespace do not make another caption
            batch["caption_id"] = torch.tensor([stable_id(" ".join(c.split())) for c in captions], dtype=torch.int64)
        return batch


def is_image_batch(v) -> bool:
    """uint8 [B, 3, H, W]: images as the loaders hand them out."""
    return isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.ndim == 4


def to_device(batch: dict, device, dtype, images: str = "normalised") -> dict:
    """A batch on the device: uint8 image batches normalised there into `dtype` (images="uint8":
    kept as bytes, for `model_inputs` to normalise later), other floats cast to `dtype`, integers
    as they are, non-tensors (counts) untouched. The copies do not block (the loader's memory is
    pinned on CUDA)."""
    out = {}
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
        elif is_image_batch(v):
            v = v.to(device, non_blocking=True)
            out[k] = v if images == "uint8" else normalize_images(v, dtype)
        else:
            out[k] = v.to(device, dtype if v.is_floating_point() else None, non_blocking=True)
    return out


def model_inputs(batch: dict, dtype) -> dict:
    """What a model's forward takes from a batch (or a gradient-cache chunk of one) on the device:
    uint8 image batches normalised into `dtype` where they are, the rest as it is. The training
    step calls it per chunk, so a step holds one chunk's images as floats at a time."""
    return {k: normalize_images(v, dtype) if is_image_batch(v) else v for k, v in batch.items()}


def collate_images_labels(items):
    return torch.stack([x[0] for x in items]), torch.tensor([x[2] for x in items])


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to the trainer: torchrun and Slurm signal the whole
    process group, and a worker killed by them takes the trainer down before it can checkpoint."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class _Position:
    """(epoch, step) of the next batch: what a checkpoint saves of a stream. The position does not
    depend on the number of ranks (each step is one global batch, split over whoever runs it); a
    resume with another global batch size continues at the same sample when it can."""

    epoch = step = 0
    last_ids: list = []  # the samples of the batch just yielded (train.sample_log)
    steps_per_epoch: int
    global_batch: int

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        saved = int(state.get("global_batch", self.global_batch))
        if saved != self.global_batch:
            done = self.step * saved
            if done % self.global_batch:
                raise ConfigError(f"train.global_batch_size: the checkpoint stopped {done} samples into epoch "
                                  f"{self.epoch} with batches of {saved}; {self.global_batch} does not divide {done}, "
                                  f"so no step starts there: resume with {saved} (or train.resume=false)")
            self.step = done // self.global_batch

    def metrics(self) -> dict:
        """What the stream adds to a logged step (none unless a subclass says)."""
        return {}

    def _advance(self) -> None:
        # before the batch is yielded: a checkpoint taken after it resumes at the next one
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0


class BatchStream(_Position):
    """Endless, rank-sharded, resumable stream of local batches over epochs."""

    def __init__(self, dataset: Dataset, collate, global_batch: int, rank: int, world: int,
                 seed: int = 0, num_workers: int = 0, mixture=None):
        """mixture: a data.mixture.SourceMixture whose epoch order replaces the permutation."""
        self.dataset, self.collate, self.mixture = dataset, collate, mixture
        self.global_batch, self.local_batch = global_batch, global_batch // world
        self.rank, self.seed, self.num_workers = rank, seed, num_workers
        size = mixture.epoch_size if mixture else len(dataset)
        self.steps_per_epoch = size // global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.global_batch_size: {global_batch} is larger than the epoch ({size} samples)")
        self._order = (None, None)  # (epoch, its order): computed once per epoch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Every sample index of the epoch in order; global batch s is order[s * G:(s + 1) * G]."""
        if self._order[0] != epoch:
            if self.mixture:
                order = self.mixture.order(epoch)
            else:
                order = torch.randperm(len(self.dataset), generator=torch_generator("epoch_order", self.seed, epoch))
            self._order = (epoch, order)
        return self._order[1]

    def local_indices(self, epoch: int, step: int) -> list[tuple]:
        start = step * self.global_batch + self.rank * self.local_batch
        return [(self.seed, epoch, i) for i in self.epoch_order(epoch)[start:start + self.local_batch].tolist()]

    def metrics(self) -> dict:
        """samples/<source>: the samples drawn from each weighted source so far (the same on every rank)."""
        if not self.mixture:
            return {}
        drawn = self.mixture.drawn(self.epoch, self.epoch_order(self.epoch)[:self.step * self.global_batch])
        return {f"samples/{name}": n for name, n in drawn.items()}

    def __iter__(self):
        while True:
            epoch, first = self.epoch, self.step
            batches = [self.local_indices(epoch, s) for s in range(first, self.steps_per_epoch)]
            # pinned host memory: the trainer's non_blocking copy to the GPU then overlaps compute
            loader = DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate,
                                num_workers=self.num_workers, persistent_workers=False,
                                worker_init_fn=ignore_stop_signals, pin_memory=torch.cuda.is_available())
            for indices, batch in zip(batches, loader):
                self.last_ids = [i for _, _, i in indices]  # positions in the dataset
                self._advance()
                yield batch

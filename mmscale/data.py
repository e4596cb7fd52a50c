"""Map-style image-caption datasets and a rank-sharded batch stream with exact resume.

The stream is a pure function of (seed, epoch, step): each epoch is one seeded permutation
cut into global batches, rank r takes its slice of each. Its state is (epoch, step), so a
resumed run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .config import ConfigError, DataConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def image_transform(size: int, train: bool):
    """open_clip-style: light random resized crop for training, resize + centre crop for eval."""
    from torchvision import transforms as T
    if train:
        head = [T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
    else:
        head = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    return T.Compose(head + [T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


@dataclass
class Sample:
    image: object  # a path or a PIL image
    caption: str
    label: int = -1


class KeyedDataset(Dataset):
    """Items are (image tensor, caption, label, skipped).

    Indexed by (seed, epoch, i), the random augmentation is a function of that key alone, so it
    is the same whichever worker or resumed run draws it. A sample that cannot be read is
    replaced by the next readable one (deterministically, so resume stays exact) and counted
    in `skipped`, which travels with the batch to the engine's log.
    """

    max_skip = 16

    def __init__(self, transform):
        self.transform = transform

    def load(self, i: int) -> tuple:  # (PIL image, caption, label)
        raise NotImplementedError

    def name(self, i: int) -> str:
        return str(i)

    def __getitem__(self, key):
        seed, epoch, i = key if isinstance(key, tuple) else (0, 0, key)
        for skipped in range(self.max_skip):
            j = (i + skipped) % len(self)
            try:
                image, caption, label = self.load(j)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + j)
                    return self.transform(image), caption, label, skipped
            except (OSError, ValueError) as e:  # PIL raises OSError subclasses for corrupt files
                warnings.warn(f"skipping unreadable sample {self.name(j)}: {e}")
        raise RuntimeError(f"{self.max_skip} unreadable samples in a row from {self.name(i)}")


class CaptionDataset(KeyedDataset):
    def __init__(self, samples: list[Sample], transform):
        super().__init__(transform)
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def name(self, i):
        return str(self.samples[i].image) if not isinstance(self.samples[i].image, Image.Image) else f"#{i}"

    def load(self, i):
        s = self.samples[i]
        image = s.image if isinstance(s.image, Image.Image) else Image.open(s.image)
        image.load()
        return image, s.caption, s.label


def _in_place(url: str) -> str:
    return url


class ShardDataset(KeyedDataset):
    """Random access into the tar shards of tools/build_shards.py through webdataset's wids
    index, so the exact, resumable BatchStream works on shards as on folders."""

    def __init__(self, folder: str, transform):
        from .shards import read_index
        super().__init__(transform)
        self.shardlist = read_index(folder)
        self.size = sum(s["nsamples"] for s in self.shardlist)
        self._ds = None  # opened lazily: each loader worker needs its own file handles

    def __len__(self):
        return self.size

    def _dataset(self):
        if self._ds is None:
            import contextlib
            import io
            import wids
            with contextlib.redirect_stderr(io.StringIO()):  # wids prints a banner per open
                # read local shards in place: wids' default copies them into a cache keyed by
                # path, which serves stale data once a folder is rebuilt
                self._ds = wids.ShardListDataset(self.shardlist, transformations=[], localname=_in_place)
        return self._ds

    def name(self, i):
        return f"sample {i} of {len(self.shardlist)} shards"

    def load(self, i):
        sample = self._dataset()[i]
        image_key = next((k for k in (".jpg", ".jpeg", ".png", ".webp") if k in sample), None)
        if image_key is None or ".txt" not in sample:
            raise ValueError(f"{sample.get('__key__')} has no image or no .txt")
        image = Image.open(sample[image_key])
        image.load()
        return image, sample[".txt"].read().decode("utf-8").strip(), -1


@dataclass
class Splits:
    train: list[Sample]
    eval: list[Sample]
    classnames: list[str]


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * fraction))
        held.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(train), np.sort(held)


def load_splits(cfg: DataConfig) -> Splits:
    if cfg.type == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        images = [Image.fromarray((img * (255.0 / 16.0)).astype(np.uint8)) for img in d.images]
        labels, names = d.target, DIGIT_NAMES
    elif cfg.type == "imagefolder":
        names = sorted(e for e in os.listdir(cfg.root) if os.path.isdir(os.path.join(cfg.root, e)))
        if not names:
            raise ConfigError(f"data.root: no class folders in {cfg.root}")
        images, labels = [], []
        for c, name in enumerate(names):
            files = sorted(f for f in os.listdir(os.path.join(cfg.root, name)) if f.lower().endswith(IMAGE_EXTS))
            files = files[:cfg.max_per_class] if cfg.max_per_class else files
            images += [os.path.join(cfg.root, name, f) for f in files]
            labels += [c] * len(files)
        labels = np.asarray(labels)
    elif cfg.type == "coco":
        with open(cfg.captions) as f:
            coco = json.load(f)
        files = {im["id"]: os.path.join(cfg.root, im["file_name"]) for im in coco["images"]}
        samples = [Sample(files[a["image_id"]], a["caption"].strip()) for a in coco["annotations"]]
        return Splits(samples, [], [])
    else:
        raise ConfigError(f"data.type: {cfg.type!r} is not supported")
    train_idx, eval_idx = _stratified_split(labels, cfg.eval_fraction, cfg.seed)

    def make(idx):
        return [Sample(images[i], cfg.caption_template.format(names[labels[i]]), int(labels[i])) for i in idx]
    return Splits(make(train_idx), make(eval_idx), list(names))


class Collate:
    def __init__(self, tokenize):
        self.tokenize = tokenize

    def __call__(self, items):
        images, captions, labels, skipped = zip(*items)
        return {"image": torch.stack(images), **self.tokenize(list(captions)), "label": torch.tensor(labels),
                "skipped": torch.tensor(sum(skipped))}


def collate_images_labels(items):
    return torch.stack([x[0] for x in items]), torch.tensor([x[2] for x in items])


class BatchStream:
    """Endless, rank-sharded, resumable stream of local batches over epochs."""

    def __init__(self, dataset: Dataset, collate, global_batch: int, rank: int, world: int,
                 seed: int = 0, num_workers: int = 0):
        self.dataset, self.collate = dataset, collate
        self.global_batch, self.local_batch = global_batch, global_batch // world
        self.rank, self.seed, self.num_workers = rank, seed, num_workers
        self.steps_per_epoch = len(dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.global_batch_size: {global_batch} is larger than the dataset ({len(dataset)} samples)")
        self.epoch, self.step = 0, 0  # position of the next batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def local_indices(self, epoch: int, step: int) -> list[tuple]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.dataset), generator=g)
        start = step * self.global_batch + self.rank * self.local_batch
        return [(self.seed, epoch, i) for i in perm[start:start + self.local_batch].tolist()]

    def __iter__(self):
        while True:
            epoch, first = self.epoch, self.step
            batches = [self.local_indices(epoch, s) for s in range(first, self.steps_per_epoch)]
            loader = DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate,
                                num_workers=self.num_workers, persistent_workers=False)
            for batch in loader:
                # advance before yielding: a checkpoint taken after this batch resumes at the next one
                self.step += 1
                if self.step == self.steps_per_epoch:
                    self.epoch, self.step = self.epoch + 1, 0
                yield batch


class ShardStream:
    """Streams WebDataset shards (tools/build_shards.py output) for training.

    Shards are resampled: every rank and loader worker draws shards with its own seed, the
    usual setup for multi-node streaming (no constraint between shard and rank counts).
    Steps per epoch come from data.num_samples so the LR schedule is right. Resume restores
    the step and epoch; the samples after a resume are a fresh draw, not a replay.
    Undecodable samples are skipped with a warning rather than stopping the run.
    """

    def __init__(self, urls: str, num_samples: int, transform, collate, global_batch: int, rank: int,
                 world: int, seed: int = 0, num_workers: int = 0, shuffle_buffer: int = 5000):
        self.urls, self.transform, self.collate = urls, transform, collate
        self.local_batch, self.rank, self.seed = global_batch // world, rank, seed
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.steps_per_epoch = num_samples // global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.num_samples: {num_samples} is smaller than one global batch ({global_batch})")
        self.epoch, self.step = 0, 0

    state_dict = BatchStream.state_dict
    load_state_dict = BatchStream.load_state_dict

    def _pipeline(self):
        import webdataset as wds
        skip = wds.warn_and_continue
        return wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=self.seed * 100_003 + self.rank * 1_009 + self.epoch, deterministic=True),
            wds.tarfile_to_samples(handler=skip),
            wds.shuffle(self.shuffle_buffer),
            wds.decode("pil", handler=skip),
            wds.to_tuple("jpg;jpeg;png;webp", "txt", handler=skip),
            wds.map(lambda s: (self.transform(s[0]), s[1].strip(), -1, 0), handler=skip),
            wds.batched(self.local_batch, collation_fn=self.collate, partial=False),
        )

    def __iter__(self):
        import webdataset as wds
        loader = wds.WebLoader(self._pipeline(), batch_size=None, num_workers=self.num_workers)
        for batch in loader:
            self.step += 1
            if self.step == self.steps_per_epoch:
                self.epoch, self.step = self.epoch + 1, 0
            yield batch

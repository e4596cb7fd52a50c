"""Image-caption samples and datasets: the transform, keyed augmentation (exact resume), class
folders, scikit-learn's digits and COCO captions, and the held-out split for zero-shot."""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import ConfigError, DataConfig
from ..seeds import numpy_rng, seed_for, seed_torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _to_rgb(image):
    return image.convert("RGB")


def image_transform(size: int, train: bool):
    """open_clip-style: light random resized crop for training, resize + centre crop for eval.
    Gives uint8 [3, size, size]: images cross to the device as bytes (a quarter of float32's
    traffic) and `normalize_images` makes them floats there."""
    from torchvision import transforms as T
    if train:
        head = [T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
    else:
        head = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    return T.Compose(head + [T.Lambda(_to_rgb), T.PILToTensor()])


_MEAN_STD: dict = {}  # device -> (mean, std) as [1, 3, 1, 1] float32 tensors there


def mean_std(device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std on `device`, made once per device: built from Python lists at every
    batch they would be two pageable host-to-device copies, each a wait for the GPU."""
    device = torch.device(device)
    if device not in _MEAN_STD:
        _MEAN_STD[device] = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return _MEAN_STD[device]


def normalize_images(images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 [B, 3, H, W] (on any device) -> CLIP-normalised floats of `dtype`, computed in float32
    where the images are: (x / 255 - mean) / std, the values torchvision's ToTensor + Normalize give."""
    mean, std = mean_std(images.device)
    return ((images.float() / 255 - mean) / std).to(dtype)


def stable_id(value: str | bytes) -> int:
    """A signed 64-bit id of a string or bytes, the same in every process and on every rank
    (Python's hash() is salted per process): the positives keys of captions and of image bytes."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


@dataclass
class Sample:
    image: object  # a path or a PIL image
    caption: str
    label: int = -1
    image_id: int | None = None  # samples of one image share it (COCO's image id); None: the path, else the index


def brief_error(e: Exception) -> str:
    """An error's message without the addresses PIL puts in it (<_io.BytesIO object at 0x...>)."""
    return re.sub(r" ?<[\w.]+ object at 0x[0-9a-f]+>", "", str(e))


class UnreadableData(ConfigError):
    """No readable sample among the candidates one draw may try: the data is nearly all unreadable.
    One line (exit 2), also from a loader worker, whose exception torch re-raises in the trainer as
    this type around a copy of the worker's traceback: only the original line is kept."""

    def __init__(self, message: str):
        if message.startswith("Caught ") and f"{type(self).__name__}: " in message:
            message = message.rstrip().rsplit(f"{type(self).__name__}: ", 1)[1]
        super().__init__(message)


class KeyedDataset(Dataset):
    """Items are (image tensor, caption, label, skipped, image_id); image_id is the same for
    samples of one image (loss.positives: image), an int64.

    Indexed by (seed, epoch, i), the random augmentation is a function of that key alone, so it
    is the same whichever worker or resumed run draws it. A sample that cannot be read is
    replaced by another one, picked by a hash of (seed, epoch, i, try) over the whole dataset
    (so resume stays exact, and the stand-ins for a lost shard are spread over the data instead
    of all being the sample after it), and counted in `skipped`, which travels with the batch to
    the engine's log (data.max_unreadable bounds the share).
    """

    max_skip = 64  # candidates one draw may reject: 65 failures in a row means next to nothing reads

    def __init__(self, transform):
        self.transform = transform

    def load(self, i: int) -> tuple:  # (PIL image, caption, label, image_id)
        raise NotImplementedError

    def name(self, i: int) -> str:
        return str(i)

    def after(self, j: int, draw: tuple) -> int:
        """The candidate tried after unreadable sample j, for draw = (seed, epoch, i, try)."""
        return seed_for("replace", *draw) % len(self)

    def __getitem__(self, key):
        seed, epoch, i = key if isinstance(key, tuple) else (0, 0, key)
        j, last = i, None
        for skipped in range(self.max_skip + 1):
            try:
                image, caption, label, image_id = self.load(j)
            except (OSError, ValueError) as e:  # PIL raises OSError subclasses for corrupt files
                if not getattr(e, "reported", False):  # a dropped shard said so once, in one line
                    warnings.warn(f"skipping unreadable sample {self.name(j)}: {e}")
                j, last = self.after(j, (seed, epoch, i, skipped)), e
                continue
            with torch.random.fork_rng(devices=[]):
                seed_torch("augment", seed, epoch, j)
                return self.transform(image), caption, label, skipped, image_id
        raise UnreadableData(f"data: none of {self.max_skip + 1} samples tried in place of {self.name(i)} could be "
                             f"read (the last: {brief_error(last)}): nearly all of the data is unreadable; check it "
                             f"(mmscale-curate drops what does not decode)")


class CaptionDataset(KeyedDataset):
    def __init__(self, samples: list[Sample], transform):
        super().__init__(transform)
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def name(self, i):
        return str(self.samples[i].image) if not isinstance(self.samples[i].image, Image.Image) else f"#{i}"

    def label(self, i) -> int:
        return self.samples[i].label

    def load(self, i):
        s = self.samples[i]
        image = s.image if isinstance(s.image, Image.Image) else Image.open(s.image)
        image.load()
        return image, s.caption, s.label, self.image_id(i)

    def image_id(self, i) -> int:
        """The sample's own image id (COCO's), else its file's (one file, one image: the path as the
        recipe names it, the same string on every rank), else its index."""
        s = self.samples[i]
        if s.image_id is not None:
            return s.image_id
        return i if isinstance(s.image, Image.Image) else stable_id(str(s.image))


class SyntheticPairs(KeyedDataset):
    """n image-caption pairs made from their index alone: uniform random pixels (seeded by the
    index) and the caption template filled with a digit name (label i mod 10). For measuring
    speed and memory at any batch size without reading data; nothing here can be learnt."""

    def __init__(self, n: int, size: int, template: str, transform):
        super().__init__(transform)
        self.n, self.size, self.template = n, size, template

    def __len__(self):
        return self.n

    def label(self, i) -> int:
        return i % 10

    def load(self, i):
        g = numpy_rng("synthetic", i)
        pixels = g.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
        return Image.fromarray(pixels), self.template.format(DIGIT_NAMES[i % 10]), i % 10, i


def scan_class_folders(root: str, max_per_class: int = 0) -> tuple[list[str], list[int], list[str]]:
    """(image files, class index of each, class folder names) of root/<class>/*, classes in
    sorted folder order, files sorted within each class, at most max_per_class each (0 = all)."""
    folders = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
    files, labels = [], []
    for label, folder in enumerate(folders):
        names = sorted(f for f in os.listdir(os.path.join(root, folder)) if f.lower().endswith(IMAGE_EXTS))
        names = names[:max_per_class] if max_per_class else names
        files += [os.path.join(root, folder, f) for f in names]
        labels += [label] * len(names)
    return files, labels, folders


@dataclass
class Splits:
    train: list[Sample]
    eval: list[Sample]
    classnames: list[str]


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) sorted indices; each class holds out round(fraction * its count)."""
    rng = numpy_rng("split", seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * fraction))
        held.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(train), np.sort(held)


def load_splits(cfg: DataConfig) -> Splits:
    """Training pairs and a held-out labelled split for zero-shot (digits, imagefolder), or
    COCO's caption pairs (no held-out split)."""
    if cfg.type == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        images = [Image.fromarray((img * (255.0 / 16.0)).astype(np.uint8)) for img in d.images]
        labels, names = d.target, DIGIT_NAMES
    elif cfg.type == "imagefolder":
        images, labels, names = scan_class_folders(cfg.root, cfg.max_per_class)
        if not names:
            raise ConfigError(f"data.root: no class folders in {cfg.root}")
        labels = np.asarray(labels)
    elif cfg.type == "coco":
        with open(cfg.captions) as f:
            coco = json.load(f)
        files = {im["id"]: os.path.join(cfg.root, im["file_name"]) for im in coco["images"]}
        samples = [Sample(files[a["image_id"]], a["caption"].strip(), image_id=int(a["image_id"]))
                   for a in coco["annotations"]]
        return Splits(samples, [], [])
    else:
        raise ConfigError(f"data.type: {cfg.type!r} is not supported")
    train_idx, eval_idx = stratified_split(labels, cfg.eval_fraction, cfg.seed)

    def make(idx):
        return [Sample(images[i], cfg.caption_template.format(names[labels[i]]), int(labels[i])) for i in idx]
    return Splits(make(train_idx), make(eval_idx), list(names))

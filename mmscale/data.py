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

    def label(self, i) -> int:
        return self.samples[i].label

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
        return image, sample[".txt"].read().decode("utf-8").strip(), self._label(sample)

    def label(self, i) -> int:
        return self._label(self._dataset()[i])  # reads the tar members, decodes no image

    @staticmethod
    def _label(sample: dict) -> int:
        """The class of a classification shard: a .cls member, or "label" in img2dataset's .json."""
        if ".cls" in sample:
            return int(sample[".cls"].read().decode().strip())
        if ".json" in sample:
            return int(json.loads(sample[".json"].read()).get("label", -1))
        return -1


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


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to the trainer: torchrun and Slurm signal the whole
    process group, and a worker killed by them takes the trainer down before it can checkpoint."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


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
                                num_workers=self.num_workers, persistent_workers=False,
                                worker_init_fn=ignore_stop_signals)
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
        loader = wds.WebLoader(self._pipeline(), batch_size=None, num_workers=self.num_workers,
                               worker_init_fn=ignore_stop_signals)
        for batch in loader:
            self.step += 1
            if self.step == self.steps_per_epoch:
                self.epoch, self.step = self.epoch + 1, 0
            yield batch


# ---------------------------------------------------------------- fine-tuning data (task classify)

@dataclass
class LabelledSplits:
    """Per-modality inputs and labels of a classification data set."""
    train: Dataset
    val: Dataset | None
    test: Dataset | None
    classnames: list[str]
    input_dims: dict  # tabular modality name -> feature count


def stratified_holdout(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices; each class keeps its share in both."""
    if fraction <= 0:
        return np.arange(len(labels)), np.arange(0)
    return _stratified_split(np.asarray(labels), fraction, seed)


class ArrayDataset(Dataset):
    """Rows of per-modality arrays with labels; items are ({name: row}, label)."""

    def __init__(self, arrays: dict[str, torch.Tensor], labels: torch.Tensor):
        self.arrays, self.labels = arrays, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        i = key[2] if isinstance(key, tuple) else key
        return {k: v[i] for k, v in self.arrays.items()}, int(self.labels[i])

    def subset(self, idx) -> "ArrayDataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ArrayDataset({k: v[idx] for k, v in self.arrays.items()}, self.labels[idx])


def collate_arrays(items) -> dict:
    rows, labels = zip(*items)
    return {**{k: torch.stack([r[k] for r in rows]) for k in rows[0]}, "label": torch.tensor(labels)}


def _read_csv_matrix(path: str) -> np.ndarray:
    try:
        return np.loadtxt(path, delimiter=",", ndmin=2)
    except ValueError as e:
        raise ConfigError(f"data.root: {path} is not a numeric CSV matrix: {e}") from None


def load_multiview(cfg: DataConfig, modalities, seed: int = 0) -> LabelledSplits:
    """MOGONET's layout: <root>/{view}_tr.csv, {view}_te.csv (samples x features, no header) and
    labels_tr.csv, labels_te.csv (one integer class per line). Normalisation statistics come from
    the training rows only (before the validation rows are split off)."""
    def labels(split):
        y = _read_csv_matrix(os.path.join(cfg.root, f"labels_{split}.csv")).reshape(-1)
        if not np.all(y == np.round(y)) or y.min() < 0:
            raise ConfigError(f"data.root: labels_{split}.csv must hold class numbers 0..C-1")
        return torch.as_tensor(y.astype(np.int64))

    y_tr = labels("tr")
    has_test = os.path.isfile(os.path.join(cfg.root, "labels_te.csv"))
    y_te = labels("te") if has_test else None
    train, test, dims = {}, {}, {}
    for m in modalities:
        view = m.key or m.name
        tr = _read_csv_matrix(os.path.join(cfg.root, f"{view}_tr.csv"))
        if len(tr) != len(y_tr):
            raise ConfigError(f"data.root: {view}_tr.csv has {len(tr)} rows, labels_tr.csv {len(y_tr)}")
        te = _read_csv_matrix(os.path.join(cfg.root, f"{view}_te.csv")) if has_test else None
        if te is not None and (len(te) != len(y_te) or te.shape[1] != tr.shape[1]):
            raise ConfigError(f"data.root: {view}_te.csv is {te.shape}, expected {len(y_te)} rows x {tr.shape[1]}")
        if cfg.normalize == "minmax":
            lo, span = tr.min(0), tr.max(0) - tr.min(0) + 1e-10
            tr, te = (tr - lo) / span, None if te is None else (te - lo) / span
        elif cfg.normalize == "standard":
            mu, sd = tr.mean(0), tr.std(0) + 1e-10
            tr, te = (tr - mu) / sd, None if te is None else (te - mu) / sd
        train[m.name] = torch.as_tensor(tr, dtype=torch.float32)
        if te is not None:
            test[m.name] = torch.as_tensor(te, dtype=torch.float32)
        dims[m.name] = tr.shape[1]
    full = ArrayDataset(train, y_tr)
    keep, held = stratified_holdout(y_tr.numpy(), cfg.val_fraction, seed)
    classes = int(max(y_tr.max(), y_te.max() if y_te is not None else 0)) + 1
    return LabelledSplits(full.subset(keep), full.subset(held) if len(held) else None,
                          ArrayDataset(test, y_te) if has_test else None, [str(c) for c in range(classes)], dims)


def _read_jsonl(path: str, classnames: list[str] | None) -> tuple[list[Sample], list[str]]:
    """{"image": path (relative to the file's folder), "text": str, "label": int or class name} per line."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((row["image"], str(row["text"]), row["label"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{n}: not an image-text-label line ({e})") from None
    if not rows:
        raise ConfigError(f"{path}: no image-text-label lines")
    if classnames is None:
        names = sorted({r[2] for r in rows if isinstance(r[2], str)})
        classnames = names or [str(c) for c in range(max(int(r[2]) for r in rows) + 1)]
    index = {c: i for i, c in enumerate(classnames)}
    base = os.path.dirname(os.path.abspath(path))
    samples = []
    for n, (image, text, label) in enumerate(rows, 1):
        y = index.get(label) if isinstance(label, str) else int(label)
        if y is None or not 0 <= y < len(classnames):
            raise ConfigError(f"{path}:{n}: label {label!r} is not one of {len(classnames)} classes")
        samples.append(Sample(image if os.path.isabs(image) else os.path.join(base, image), text, y))
    return samples, classnames


class LabelledCaptions(Dataset):
    """Image-text-label items for task classify, over a caption dataset (JSONL or shards)."""

    def __init__(self, base: KeyedDataset, indices=None):
        self.base, self.indices = base, indices

    def __len__(self):
        return len(self.indices) if self.indices is not None else len(self.base)

    def __getitem__(self, key):
        seed, epoch, i = key if isinstance(key, tuple) else (0, 0, key)
        j = int(self.indices[i]) if self.indices is not None else i
        return self.base[(seed, epoch, j)]

    def labels(self) -> list[int]:
        ids = self.indices if self.indices is not None else range(len(self.base))
        return [self.base.label(int(j)) for j in ids]


def load_imagetext(cfg: DataConfig, image_size: int, seed: int = 0) -> LabelledSplits:
    """data.train / data.test: JSONL files or build_shards folders whose samples carry .cls or a
    "label" in their .json. Training items are augmented; validation and test items are not."""
    def open_split(path, classnames):
        """(the split with the training transform, without it, class names); a JSONL file is read once."""
        augment, plain = image_transform(image_size, train=True), image_transform(image_size, train=False)
        if os.path.isdir(path):
            return ShardDataset(path, augment), ShardDataset(path, plain), classnames
        samples, classnames = _read_jsonl(path, classnames)
        return CaptionDataset(samples, augment), CaptionDataset(samples, plain), classnames

    train, plain, classnames = open_split(cfg.train, None)
    labels = LabelledCaptions(train).labels()
    if min(labels) < 0:
        raise ConfigError(f"data.train: {cfg.train} has samples without a label")
    if isinstance(train, ShardDataset):
        names = os.path.join(cfg.train, "_meta", "classes.json")  # written by build_shards --label-col
        classnames = json.load(open(names)) if os.path.isfile(names) else [str(c) for c in range(max(labels) + 1)]
    keep, held = stratified_holdout(labels, cfg.val_fraction, seed)
    test = LabelledCaptions(open_split(cfg.test, classnames)[1]) if cfg.test else None
    return LabelledSplits(LabelledCaptions(train, keep), LabelledCaptions(plain, held) if len(held) else None,
                          test, classnames, {})


class CollateLabelled:
    """Image-text-label items -> {image_name: images, text_name/input_ids, .../attention_mask, label, skipped}."""

    def __init__(self, image_name: str | None, text_name: str | None, tokenize):
        self.image_name, self.text_name, self.tokenize = image_name, text_name, tokenize

    def __call__(self, items) -> dict:
        images, captions, labels, skipped = zip(*items)
        batch = {"label": torch.tensor(labels), "skipped": torch.tensor(sum(skipped))}
        if self.image_name:
            batch[self.image_name] = torch.stack(images)
        if self.text_name:
            batch.update({f"{self.text_name}/{k}": v for k, v in self.tokenize(list(captions)).items()})
        return batch

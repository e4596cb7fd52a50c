"""Labelled multimodal data for fine-tuning (task classify): MOGONET's multi-view CSVs and
image-text-label data (JSONL files or labelled shards), with a stratified validation split."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ConfigError, DataConfig
from .images import CaptionDataset, KeyedDataset, Sample, image_transform, stratified_split
from .indexed_shards import ShardDataset



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
    return stratified_split(np.asarray(labels), fraction, seed)


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
            return ShardDataset(path, augment, cfg.on_bad_shard), ShardDataset(path, plain, cfg.on_bad_shard), classnames
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

"""Frozen-tower feature cache (CBMF): each tower's outputs over a split, computed once.

CBMF trains only the projections, contexts and the Deep Fusion Encoder on top of frozen towers,
so the towers' outputs are a fixed function of the samples. They are computed once, in eval mode
without autograd and with the eval image transform, rows sharded over the ranks and
all-gathered; rank 0 writes `<folder>/<split>-<fingerprint>.safetensors` atomically and the
other ranks read it once rank 0 has written it. The fingerprint hashes everything the numbers depend on
(tower configs and weights, feature mode, image size, max length, the samples' paths and
captions), so a changed recipe or data set never reads a stale file; a rerun or a resume
loads the file instead of running the towers again.

Identical inputs are computed once (CIFAR captions repeat per class, COCO images per caption):
the file holds the unique rows (`feat/<m>`, `mask/<m>` for tokens) and `index/<m>` maps each
sample to its row.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict

import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from ..dist import broadcast_object, gather_rows, on_rank0, rank_and_world, shard_rows
from ..files import atomic_path
from ..seeds import numpy_rng
from .images import CaptionDataset, Sample, image_transform, normalize_images
from .batches import collate_images_labels

FORMAT = 1  # bump when what a cache file means changes (transforms, layout)


def input_key(sample: Sample, kind: str, row: int):
    """What a tower reads from a sample: the caption, an image path, or (in-memory image) the row."""
    if kind == "text":
        return sample.caption
    return sample.image if isinstance(sample.image, str) else ("pil", row)


def _sample_digest(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        image = s.image.tobytes() if isinstance(s.image, Image.Image) else str(s.image).encode()
        h.update(hashlib.sha256(image).digest() + s.caption.encode() + b"\0" + str(s.label).encode() + b"\n")
    return h.hexdigest()


def _weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(model, model_cfg, samples: list[Sample]) -> str:
    """Hash of what the cached numbers depend on: tower configs (image size, max length, ...)
    and weights, the feature mode and the samples."""
    towers = [{"name": m.name, "kind": m.kind, "tower": asdict(m.tower),
               "weights": _weights_digest(model.tower(m.name))} for m in model_cfg.modalities]
    spec = {"format": FORMAT, "features": model_cfg.dfe.features, "towers": towers,
            "samples": _sample_digest(samples), "n": len(samples)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _unique(samples: list[Sample], kind: str) -> tuple[list[int], torch.Tensor]:
    """(row of the first sample of each distinct input, [N] index of each sample's distinct input)."""
    first, rows, index = {}, [], []
    for row, s in enumerate(samples):
        key = input_key(s, kind, row)
        if key not in first:
            first[key] = len(rows)
            rows.append(row)
        index.append(first[key])
    return rows, torch.tensor(index, dtype=torch.long)


@torch.no_grad()
def _tower_outputs(model, name: str, kind: str, samples: list[Sample], image_size: int, device,
                   batch_size: int) -> dict:
    """{"feat": [n, w] or [n, T, w], "mask": [n, T] (tokens)} over samples, identical on every rank."""
    idx = shard_rows(len(samples))
    feats, masks = [], []
    if kind == "image":
        ds = Subset(CaptionDataset(samples, image_transform(image_size, train=False)), idx)
        batches = (normalize_images(images.to(device)) for images, _ in
                   DataLoader(ds, batch_size=batch_size, collate_fn=collate_images_labels))
    else:
        tokenize = model.tower(name).tokenize_fn()
        batches = ({k: v.to(device) for k, v in tokenize([samples[i].caption for i in idx[j:j + batch_size]]).items()}
                   for j in range(0, len(idx), batch_size))
    for inputs in batches:
        feat, mask = model.tower_features(name, inputs)
        feats.append(feat.float())
        if mask is not None:
            masks.append(mask.to(torch.uint8))  # gloo gathers no bool tensors
    out = {"feat": gather_rows(torch.cat(feats), len(samples)).cpu()}
    if masks:
        mask = gather_rows(torch.cat(masks), len(samples)).cpu().bool()
        width = int(mask.any(0).nonzero().max()) + 1  # drop the padding no sample uses
        out = {"feat": out["feat"][:, :width].contiguous(), "mask": mask[:, :width].contiguous()}
    return out


def compute_features(model, model_cfg, samples: list[Sample], device="cpu", batch_size: int = 256) -> dict:
    """Every tower over its distinct inputs: {feat/<m>, mask/<m> (tokens), index/<m>, label}."""
    towers = {n: model.tower(n) for n in model.names}
    places = {n: next(t.parameters()).device for n, t in towers.items()}
    out = {"label": torch.tensor([s.label for s in samples], dtype=torch.long)}
    for m in model_cfg.modalities:
        size = m.tower.image_size if m.kind == "image" else 0
        rows, index = _unique(samples, m.kind)
        tower = towers[m.name]
        was_training = tower.training
        tower.to(device).eval()
        try:
            res = _tower_outputs(model, m.name, m.kind, [samples[r] for r in rows], size, device, batch_size)
        finally:
            tower.to(places[m.name]).train(was_training)
        out.update({f"{k}/{m.name}": v for k, v in res.items()})
        out[f"index/{m.name}"] = index
    return out


def expand(stored: dict, names: list[str]) -> tuple[dict, torch.Tensor]:
    """Per-sample arrays ({feat/<m>, mask/<m>}) and labels from a cache file's contents."""
    arrays = {}
    for n in names:
        index = stored[f"index/{n}"]
        arrays[f"feat/{n}"] = stored[f"feat/{n}"][index]
        if f"mask/{n}" in stored:
            arrays[f"mask/{n}"] = stored[f"mask/{n}"][index]
    return arrays, stored["label"]


def cached_features(model, model_cfg, samples: list[Sample], split: str, folder: str, device="cpu",
                    batch_size: int = 256, log=None) -> tuple[dict, torch.Tensor, dict]:
    """(per-sample arrays, labels, info) for `samples`, read from `folder` when a cache file with
    the same fingerprint is there, else computed (every rank takes part) and written by rank 0.
    info = {"split", "file", "hit", "seconds", "rows"}; log(info) is called on rank 0."""
    from safetensors.torch import load_file, save_file
    rank, _ = rank_and_world()
    tic = time.perf_counter()
    path = os.path.join(folder, f"{split}-{fingerprint(model, model_cfg, samples)}.safetensors")
    hit = broadcast_object(os.path.isfile(path))  # rank 0 decides: every rank takes the same branch
    if not hit:
        stored = compute_features(model, model_cfg, samples, device, batch_size)

        def write():
            with atomic_path(path) as tmp:
                save_file(stored, tmp, metadata={"split": split, "rows": str(len(samples)),
                                                 "seconds": f"{time.perf_counter() - tic:.1f}"})
        on_rank0(write)  # the others read the file once it is there
    if hit or rank != 0:
        stored = load_file(path)
    arrays, labels = expand(stored, [m.name for m in model_cfg.modalities])
    info = {"split": split, "file": path, "hit": hit, "seconds": round(time.perf_counter() - tic, 2),
            "rows": len(samples)}
    if rank == 0:
        print(f"mmscale: features {split}: {'loaded' if hit else 'computed'} {len(samples)} rows in "
              f"{info['seconds']} s ({path})", file=sys.stderr)
        if log:
            log(info)
    return arrays, labels, info


def split_pairs(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, val): a seeded `fraction` of the distinct images goes to val with all its captions,
    so no validation image is also a training image."""
    if fraction <= 0:
        return samples, []
    keys = [input_key(s, "image", i) for i, s in enumerate(samples)]
    groups = list(dict.fromkeys(keys))
    n_val = max(1, int(round(fraction * len(groups))))
    held = {groups[i] for i in numpy_rng("split", seed).permutation(len(groups))[:n_val]}
    return [s for s, k in zip(samples, keys) if k not in held], [s for s, k in zip(samples, keys) if k in held]

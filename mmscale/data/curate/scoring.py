"""CLIP scores of image-caption pairs (DataComp's CLIP-score baseline: the cosine of a model's image
and caption embeddings), shard by shard, in batches on this rank's device.

The model comes as a `Scorer` (mmscale/cli/curate.py makes one from an mmscale export or run, or
an open_clip `local-dir:` folder): `preprocess` turns a PIL image into a tensor in the loader's
worker processes, `score` embeds a batch on the device and returns one cosine per pair. Batches
never mix shards, so a shard's scores are written as soon as its last batch is scored and a rerun
scores only the shards without a file.
"""
from __future__ import annotations

import io
import os
import sys
import time
from typing import Callable, Protocol

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .hashing import image_member, shard_samples


class Scorer(Protocol):
    name: str  # what the scores depend on (the model's path and weights), kept beside them

    def preprocess(self, image: Image.Image) -> torch.Tensor: ...

    def score(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor: ...


class _ShardBatches(IterableDataset):
    """(shard number, offsets, images, captions, last) batches of the listed shards' samples (worker
    w of W reads shards w, w + W, ...); `last` marks a shard's final batch."""

    def __init__(self, shards: list[tuple[int, str]], preprocess: Callable, batch_size: int):
        self.shards, self.preprocess, self.batch_size = shards, preprocess, batch_size

    def __iter__(self):
        info = get_worker_info()
        mine = self.shards[info.id::info.num_workers] if info else self.shards
        for number, url in mine:
            offsets, images, captions = [], [], []
            for offset, sample in shard_samples(url, []):
                try:
                    image = Image.open(io.BytesIO(sample[image_member(sample) or "?"]))
                    tensor = self.preprocess(image.convert("RGB"))
                except (OSError, ValueError, SyntaxError, KeyError):
                    continue  # unscored: the plan drops what does not decode
                offsets.append(offset)
                images.append(tensor)
                captions.append(sample.get("txt", b"").decode("utf-8", "replace").strip())
                if len(offsets) == self.batch_size:
                    yield number, offsets, torch.stack(images), captions, False
                    offsets, images, captions = [], [], []
            yield number, offsets, torch.stack(images) if images else torch.empty(0), captions, True


@torch.no_grad()
def score_shards(scorer: Scorer, shards: list[tuple[int, str]], write: Callable, batch_size: int = 256,
                 workers: int = 1) -> None:
    """Scores every decodable sample of `shards` ([(number, tar path)]); write(number, offsets,
    scores) is called once per shard, when its last batch is scored."""
    if not shards:
        return
    loader = DataLoader(_ShardBatches(shards, scorer.preprocess, batch_size), batch_size=None,
                        num_workers=min(workers, len(shards)), pin_memory=torch.cuda.is_available())
    pending: dict[int, tuple[list, list]] = {}
    done, seen, tic = 0, 0, time.perf_counter()
    for number, offsets, images, captions, last in loader:
        got = pending.setdefault(number, ([], []))
        if offsets:
            got[0].extend(offsets)
            got[1].extend(scorer.score(images, captions).float().cpu().tolist())
            seen += len(offsets)
        if last:
            write(number, *pending.pop(number))
            done += 1
            print(f"curate: scored {done}/{len(shards)} shards on rank {os.environ.get('RANK', '0')} "
                  f"({seen / (time.perf_counter() - tic):.0f} pairs/s)", file=sys.stderr, flush=True)

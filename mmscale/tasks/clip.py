"""Task clip: CMLA contrastive pretraining of a dual encoder."""
from __future__ import annotations

from ..data.images import CaptionDataset, Splits, SyntheticPairs, image_transform, load_splits
from ..config import ConfigError
from ..config.validate import source_names
from ..data.mixture import SourceMixture
from ..data.indexed_shards import ShardDataset
from ..data.batches import BatchStream, Collate
from ..data.tar_stream import ShardStream
from ..losses import clip_loss
from ..models import DualEncoder, build_model
from .base import Progress, Task, image_text_evaluation


# loss.positives -> the batch's key for it (data/batches.py's Collate); index needs none
POSITIVES_KEYS = {"index": None, "image": "image_id", "caption": "caption_id", "label": "label"}


class ClipTask(Task):
    """Symmetric InfoNCE (CMLA eq. 5-8) or SigLIP's sigmoid loss over the batch of all ranks, with
    the rows sharing a key as positives (loss.positives)."""

    shared_outputs = ("logit_scale", "logit_bias")

    def __init__(self, cfg, logger=None):
        super().__init__(cfg, logger)
        self.splits = None

    def build_model(self) -> DualEncoder:
        return build_model(self.cfg)  # with model.init's weights, if any

    def _splits(self) -> Splits:
        if self.cfg.data.type in ("shards", "webdataset", "synthetic"):
            return Splits([], [], [])  # streamed data has no held-out split; eval sets come from eval.*
        if self.splits is None:
            self.splits = load_splits(self.cfg.data)
        return self.splits

    def train_stream(self, model: DualEncoder, rank: int, world: int):
        size, d = self.cfg.model.image.image_size, self.cfg.data
        collate = Collate(model.text_tower.tokenize_fn())
        if d.type == "webdataset":
            return ShardStream(d.shards, d.num_samples, image_transform(size, train=True), collate,
                               self.cfg.train.global_batch_size, rank, world, seed=d.seed,
                               num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer)
        mixture = None
        if d.type == "shards" and d.sources:
            ds = ShardDataset([s["shards"] for s in d.sources], image_transform(size, train=True), d.on_bad_shard)
            mixture = SourceMixture(source_names(d.sources), ds.source_sizes,
                                    [float(s.get("weight", 1.0)) for s in d.sources], d.samples_per_epoch, d.seed,
                                    batch=self.cfg.train.global_batch_size)
        elif d.type == "shards":
            ds = ShardDataset(d.shards, image_transform(size, train=True), d.on_bad_shard)
        elif d.type == "synthetic":
            ds = SyntheticPairs(d.num_samples, size, d.caption_template, image_transform(size, train=True))
        else:
            ds = CaptionDataset(self._splits().train, image_transform(size, train=True))
        if d.type == "shards" and self.cfg.loss.positives == "label" and ds.label(0) < 0:
            raise ConfigError("loss.positives: label needs class labels, and the shards' first sample has none (no .cls, "
                              "no \"label\" in its .json: build the shards with --label-col); use image or caption")
        return BatchStream(ds, collate, self.cfg.train.global_batch_size, rank, world, seed=d.seed,
                           num_workers=d.num_workers, mixture=mixture)

    def loss(self, out: dict, batch: dict, progress: Progress):
        metrics = {"temperature": 1.0 / out["logit_scale"].detach().float()}
        if "logit_bias" in out:
            metrics["logit_bias"] = out["logit_bias"].detach().float()
        key = POSITIVES_KEYS[self.cfg.loss.positives]
        return clip_loss(out, self.cfg.loss, batch[key] if key else None), metrics

    def evaluate(self, model: DualEncoder, device, dtype) -> dict:
        splits = self._splits()
        return image_text_evaluation(self.cfg, model, splits.eval, splits.classnames, device, dtype)

"""Tasks: what the engine trains. A task gives the model, a parameter-free loss over the
model's outputs, the training data and its evaluation; the engine does everything else
(DeepSpeed, gradient cache, schedule, checkpoints, logging, export).

Contract, so the gradient cache can wrap any task:
- model(batch) returns a dict of tensors, each per sample (leading dim = batch) except the
  names listed in `shared_outputs` (e.g. the logit scale);
- loss(outputs) -> (scalar loss, metrics) uses only those outputs, never model parameters.
Fine-tuning tasks (CBMF, UniS-MMC, M3CoL) plug in as further classes here.
"""
from __future__ import annotations

import os

from .config import Config, save_config
from .data import (BatchStream, CaptionDataset, Collate, ShardDataset, ShardStream, Splits, image_transform,
                   load_splits)
from .evaluate import resolve_templates, run_evaluations, zeroshot_eval
from .losses import contrastive_loss
from .models import DualEncoder


class ClipTask:
    """CMLA contrastive pretraining of a dual encoder."""

    shared_outputs = ("logit_scale",)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.splits = None

    def build_model(self) -> DualEncoder:
        return DualEncoder(self.cfg.model)

    def loss(self, out: dict):
        loss = contrastive_loss(out["image"], out["text"], out["logit_scale"], self.cfg.loss.variant)
        return loss, {"temperature": 1.0 / out["logit_scale"].detach().float().item()}

    def _splits(self):
        if self.cfg.data.type in ("shards", "webdataset"):
            return Splits([], [], [])  # streamed data has no held-out split; eval sets come from eval.*
        if self.splits is None:
            self.splits = load_splits(self.cfg.data)
        return self.splits

    def train_stream(self, model: DualEncoder, rank: int, world: int):
        size, d = self.cfg.model.image.image_size, self.cfg.data
        if d.type == "webdataset":
            return ShardStream(d.shards, d.num_samples, image_transform(size, train=True),
                               Collate(model.text_tower.tokenize_fn()), self.cfg.train.global_batch_size,
                               rank, world, seed=d.seed, num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer)
        if d.type == "shards":
            ds = ShardDataset(d.shards, image_transform(size, train=True))
        else:
            ds = CaptionDataset(self._splits().train, image_transform(size, train=True))
        return BatchStream(ds, Collate(model.text_tower.tokenize_fn()), self.cfg.train.global_batch_size,
                           rank, world, seed=self.cfg.data.seed, num_workers=self.cfg.data.num_workers)

    def evaluate(self, model: DualEncoder, device, dtype) -> dict:
        """Zero-shot top-1/top-5 on the held-out split plus the eval.* datasets (zero-shot,
        retrieval, linear probe). Every rank calls it: evaluate.py shards the images over
        the ranks and all-gathers the embeddings, so every rank runs the same forwards."""
        e = self.cfg.eval
        size = self.cfg.model.image.image_size
        was_training = model.training
        model.eval()
        metrics = {}
        splits = self._splits()
        if e.zeroshot and splits.eval and splits.classnames:
            metrics.update({f"zeroshot/{k}": v for k, v in zeroshot_eval(
                model, splits.eval, splits.classnames, resolve_templates(e.templates), size, device, dtype,
                e.batch_size).items()})
        extra, _ = run_evaluations(
            model, {"zeroshot": e.zeroshot_datasets, "retrieval": e.retrieval_datasets, "linear_probe": e.linear_probe},
            templates=e.templates, image_size=size, device=device, dtype=dtype, max_per_class=e.max_per_class,
            max_images=e.max_images, retrieval_k=e.retrieval_k, batch_size=e.batch_size)
        model.train(was_training)
        return {**metrics, **extra}

    def save_export_config(self, model: DualEncoder, folder: str) -> None:
        """config.yaml that rebuilds the exported model offline: the HF text tower's config and
        tokenizer are written next to the weights and nothing is marked pretrained."""
        import copy
        cfg = copy.deepcopy(self.cfg)
        cfg.model.image.pretrained = False
        if cfg.model.text.source == "hf":
            text_dir = os.path.join(folder, "text")
            model.text_tower.model.config.save_pretrained(text_dir)
            model.text_tower.tokenizer.save_pretrained(text_dir)
            cfg.model.text.name, cfg.model.text.pretrained, cfg.model.text.config_overrides = "text", False, {}
        save_config(cfg, os.path.join(folder, "config.yaml"))


TASKS = {"clip": ClipTask}


def build_task(cfg: Config):
    return TASKS[cfg.task](cfg)

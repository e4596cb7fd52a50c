"""Tasks: what the engine trains. A task gives the model, a parameter-free loss over the
model's outputs, the training data and its evaluation; the engine does everything else
(DeepSpeed, gradient cache, schedule, checkpoints, logging, export).

Contract, so the gradient cache can wrap any task:
- model(batch) returns a dict of tensors, each per sample (leading dim = batch) except the
  names listed in `shared_outputs` (e.g. the logit scale);
- loss(outputs, batch) -> (scalar loss, metrics) uses only those outputs and the batch's
  labels, never model parameters; metrics are scalar tensors (read only on logged steps).

Tasks: clip (CMLA pretraining), classify (UniS-MMC, M3CoL and the concatenation baselines),
cbmf (CBMF's Deep Fusion Encoder over frozen towers).
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config, ConfigError, image_size, save_config, tower_config
from .data import (ArrayDataset, BatchStream, CaptionDataset, Collate, CollateLabelled, ShardDataset, ShardStream,
                   Splits, collate_arrays, image_transform, load_imagetext, load_multiview, load_splits)
from .evaluate import classification_metrics, predict, resolve_templates, run_evaluations, zeroshot_eval
from .features import cached_features, split_pairs
from .fusion import CBMF, FusionClassifier
from .losses import (contrastive_loss, gather_outputs, global_index, m3co_loss, mixup_cross_entropy,
                     multisoftclip_loss, soft_target_contrastive_loss, unis_mmc_loss)
from .models import DualEncoder


class Task:
    shared_outputs: tuple = ()

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.step, self.total_steps = 0, 1

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called by the engine before every step (losses that follow a schedule read it)."""
        self.step, self.total_steps = step, total_steps

    def save_export_config(self, model, folder: str) -> None:
        """config.yaml that rebuilds the exported model offline: HF text towers' configs and
        tokenizers are written next to the weights and nothing is marked pretrained."""
        cfg = copy.deepcopy(self.cfg)
        m = cfg.model
        m.image.pretrained = False
        if cfg.task == "clip" and m.text.source == "hf":
            for key, value in _save_hf_text(model.text_tower, folder, "text").items():
                setattr(m.text, key, value)
        for i, mod in enumerate(m.modalities):
            if mod.kind == "image":
                mod.tower["pretrained"] = False
            elif mod.kind == "text" and tower_config(mod, i).source == "hf":
                mod.tower.update(_save_hf_text(model.tower(mod.name), folder, f"text_{mod.name}"))
        save_config(cfg, os.path.join(folder, "config.yaml"))


def _save_hf_text(tower, folder: str, sub: str) -> dict:
    """Writes an HF text tower's config and tokenizer to folder/sub; returns the tower settings
    that rebuild it from there (load_export resolves the relative name)."""
    tower.model.config.save_pretrained(os.path.join(folder, sub))
    tower.tokenizer.save_pretrained(os.path.join(folder, sub))
    return {"name": sub, "pretrained": False, "config_overrides": {}}


class ClipTask(Task):
    """CMLA contrastive pretraining of a dual encoder."""

    shared_outputs = ("logit_scale",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.splits = None

    @staticmethod
    def model_from_config(cfg: Config) -> DualEncoder:
        return DualEncoder(cfg.model)

    def build_model(self) -> DualEncoder:
        return DualEncoder(self.cfg.model)

    def loss(self, out: dict, batch: dict = None):
        loss = contrastive_loss(out["image"], out["text"], out["logit_scale"], self.cfg.loss.variant)
        return loss, {"temperature": 1.0 / out["logit_scale"].detach().float()}

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


class ClassifyTask(Task):
    """Supervised multimodal classification: the fused prediction's cross-entropy, the unimodal
    heads' cross-entropies and a contrastive term between the modality embeddings:

        L = CE(fused) + unimodal_weight * sum_m CE(m) + contrastive_weight * L_contrastive

    loss.contrastive picks the method: unis_mmc (UniS-MMC), m3co or multisoftclip, or m3col
    (M3Co for the first m3co_fraction of the steps, then MultiSoftClip); none with unimodal heads
    is UniConcat; loss.mixup trains the fused head on mixed inputs with mixed labels (the mixup
    baseline); one modality with unimodal_weight 0 is the unimodal baseline.
    """

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.data = None
        self.model = None

    def _data(self):
        if self.data is None:
            d = self.cfg.data
            if d.type == "multiview":
                self.data = load_multiview(d, self.cfg.model.modalities, d.seed)
            else:
                self.data = load_imagetext(d, image_size(self.cfg.model), d.seed)
        return self.data

    @staticmethod
    def model_from_config(cfg: Config) -> FusionClassifier:
        loss = cfg.loss
        return FusionClassifier(cfg.model, cfg.model.num_classes, mixup_alpha=loss.mixup_alpha,
                                unimodal_heads=loss.unimodal_weight > 0 or loss.contrastive == "unis_mmc")

    def build_model(self) -> FusionClassifier:
        data, m = self._data(), self.cfg.model
        for i, mod in enumerate(m.modalities):  # the data fixes what the recipe left open
            if mod.kind == "tabular":
                if mod.input_dim and mod.input_dim != data.input_dims[mod.name]:
                    raise ConfigError(f"model.modalities.{i}.input_dim: {mod.input_dim}, but the data has "
                                      f"{data.input_dims[mod.name]} features")
                mod.input_dim = data.input_dims[mod.name]
        if m.num_classes and m.num_classes != len(data.classnames):
            raise ConfigError(f"model.num_classes: {m.num_classes}, but the data has {len(data.classnames)} classes")
        m.num_classes = len(data.classnames)
        self.model = self.model_from_config(self.cfg)
        self.model.mix = self.mix_mode()
        return self.model

    def contrastive_phase(self) -> str:
        c = self.cfg.loss
        if c.contrastive != "m3col":
            return c.contrastive
        return "m3co" if self.step < c.m3co_fraction * self.total_steps else "multisoftclip"

    def mix_mode(self) -> str:
        if self.cfg.loss.mixup:
            return "shared"
        return "per_modality" if self.contrastive_phase() == "m3co" else "none"

    def set_progress(self, step: int, total_steps: int) -> None:
        super().set_progress(step, total_steps)
        if self.model is not None:
            self.model.mix = self.mix_mode()

    def collate(self, model):
        if self.cfg.data.type == "multiview":
            return collate_arrays
        kinds = {m.kind: m.name for m in self.cfg.model.modalities}
        text = kinds.get("text")
        return CollateLabelled(kinds.get("image"), text, model.tower(text).tokenize_fn() if text else None)

    def train_stream(self, model, rank: int, world: int):
        d = self.cfg.data
        return BatchStream(self._data().train, self.collate(model), self.cfg.train.global_batch_size, rank, world,
                           seed=d.seed, num_workers=d.num_workers)

    def loss(self, out: dict, batch: dict):
        c, names = self.cfg.loss, [m.name for m in self.cfg.model.modalities]
        out = gather_outputs(out)
        labels = gather_outputs({"label": batch["label"]})["label"]
        if c.mixup:
            fused = mixup_cross_entropy(out["mix_logits"], labels, global_index(out["mix_perm"]), out["mix_lambda"])
        else:
            fused = F.cross_entropy(out["logits"].float(), labels)
        total, metrics = fused, {"loss_fused": fused.detach()}
        if c.unimodal_weight > 0:
            uni = sum(F.cross_entropy(out[f"logits/{n}"].float(), labels) for n in names)
            total = total + c.unimodal_weight * uni
            metrics["loss_unimodal"] = uni.detach()
        phase = self.contrastive_phase()
        if phase != "none":
            emb = [out[f"emb/{n}"] for n in names]
            if phase == "unis_mmc":
                term = unis_mmc_loss(emb, [out[f"logits/{n}"] for n in names], labels, c.tau)
            elif phase == "m3co":
                term = m3co_loss([out[f"mix_emb/{n}"] for n in names], emb,
                                 [global_index(out[f"mix_perm/{n}"]) for n in names],
                                 [out[f"mix_lambda/{n}"] for n in names], c.tau)
            else:
                term = multisoftclip_loss(emb, c.tau)
            total = total + c.contrastive_weight * term
            metrics[f"loss_{phase}"] = term.detach()
        return total, metrics

    def evaluate(self, model, device, dtype) -> dict:
        """ACC, F1, AUC, weighted and macro F1 and the loss of the fused prediction, and each
        unimodal head's accuracy, on the validation and test splits (val/..., test/...)."""
        data, names = self._data(), [m.name for m in self.cfg.model.modalities]
        was_training = model.training
        model.eval()
        metrics = {}
        for split, ds in (("val", data.val), ("test", data.test)):
            if ds is None or len(ds) == 0:
                continue
            out = predict(model, ds, self.collate(model), device, dtype, self.cfg.eval.batch_size)
            labels = out.pop("label")
            metrics[f"{split}/loss"] = F.cross_entropy(out["logits"], labels).item()
            metrics.update({f"{split}/{k}": v for k, v in
                            classification_metrics(labels.numpy(), out["logits"].softmax(-1).numpy()).items()})
            for n in names:
                if f"logits/{n}" in out:
                    metrics[f"{split}/acc_{n}"] = (out[f"logits/{n}"].argmax(-1) == labels).float().mean().item()
        model.train(was_training)
        return metrics


class CBMFTask(Task):
    """CBMF: two frozen towers, trained projections g_m, context embeddings and one shared Deep
    Fusion Encoder, aligned with the soft-target contrastive loss (eq. 3-6) and a learnable
    temperature.

    The towers' outputs over the training pairs and the validation pairs (a data.val_fraction
    share of the training images, seeded) are computed once into data.feature_cache
    (mmscale/features.py), so training steps read cached features and never run the towers.
    Evaluation: val/loss on the cached validation features, plus for an image+text pair
    zero-shot on the held-out split and the eval.* data sets, with the towers run live.
    For a text-text pair both towers read the caption.
    """

    shared_outputs = ("logit_scale",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        d = cfg.data
        if d.type not in ("digits", "imagefolder", "coco"):
            raise ConfigError(f"data.type: task cbmf reads image-caption pairs (digits, imagefolder, coco), "
                              f"not {d.type}")
        if cfg.train.early_stopping.metric.startswith("val/") and d.val_fraction <= 0:
            raise ConfigError("data.val_fraction: early stopping on val/* needs a validation share (> 0)")
        self.names = [m.name for m in cfg.model.modalities]
        self.splits, self.cache = None, {}

    @staticmethod
    def model_from_config(cfg: Config) -> CBMF:
        return CBMF(cfg.model)

    def build_model(self) -> CBMF:
        return self.model_from_config(self.cfg)

    def _splits(self) -> dict:
        if self.splits is None:
            d = self.cfg.data
            s = load_splits(d)
            train, val = split_pairs(s.train, d.val_fraction, d.seed)
            self.splits = {"train": train, "val": val, "heldout": s.eval, "classnames": s.classnames}
        return self.splits

    def _log(self, info: dict) -> None:
        run_dir = self.cfg.train.run_dir
        if os.path.isdir(run_dir):
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"event": "features", **info}) + "\n")

    def features(self, model: CBMF, split: str, device=None):
        """The cached tower outputs of a split ("train", "val") as an ArrayDataset (None if empty)."""
        if split not in self.cache:
            samples = self._splits()[split]
            self.cache[split] = None
            if samples:
                if device is None:
                    from deepspeed.accelerator import get_accelerator
                    device = torch.device(get_accelerator().current_device_name())
                folder = self.cfg.data.feature_cache or os.path.join(self.cfg.train.run_dir, "features")
                arrays, labels, _ = cached_features(model, self.cfg.model, samples, split, folder, device,
                                                    self.cfg.eval.batch_size, log=self._log)
                self.cache[split] = ArrayDataset(arrays, labels)
        return self.cache[split]

    def train_stream(self, model: CBMF, rank: int, world: int):
        train = self.features(model, "train")
        self.features(model, "val")  # cached now too, while the towers sit on the device
        d = self.cfg.data
        return BatchStream(train, collate_arrays, self.cfg.train.global_batch_size, rank, world, seed=d.seed,
                           num_workers=d.num_workers)

    def loss(self, out: dict, batch: dict = None):
        out = gather_outputs(out, self.shared_outputs)
        a, b = self.names
        loss = soft_target_contrastive_loss(out[a], out[b], out["logit_scale"])
        return loss, {"temperature": 1.0 / out["logit_scale"].detach().float()}

    def val_loss(self, model: CBMF, device, dtype) -> float | None:
        """The loss over the cached validation pairs, in batches of about the global batch size
        (one batch if the split is smaller) drawn by a fixed shuffle, averaged over the pairs.
        Shuffled because the loss depends on the batch: a class-sorted split would put one
        caption in a whole batch, as training (random batches) never does."""
        val = self.features(model, "val", device)
        if val is None:
            return None
        out = predict(model, val, collate_arrays, device, dtype, self.cfg.eval.batch_size, keep=self.names)
        n, a, b = len(val), *self.names
        scale = model.logit_scale().detach().float().cpu()
        order = np.random.default_rng(self.cfg.data.seed).permutation(n)
        chunks = np.array_split(order, max(1, round(n / self.cfg.train.global_batch_size)))
        return sum(len(c) / n * soft_target_contrastive_loss(out[a][c], out[b][c], scale).item() for c in chunks)

    def evaluate(self, model: CBMF, device, dtype) -> dict:
        was_training = model.training
        model.eval()
        metrics = {}
        loss = self.val_loss(model, device, dtype)
        if loss is not None:
            metrics["val/loss"] = loss
        mods = self.cfg.model.modalities
        if sorted(m.kind for m in mods) == ["image", "text"]:
            e, splits = self.cfg.eval, self._splits()
            size = image_size(self.cfg.model)
            if e.zeroshot and splits["heldout"] and splits["classnames"]:
                metrics.update({f"zeroshot/{k}": v for k, v in zeroshot_eval(
                    model, splits["heldout"], splits["classnames"], resolve_templates(e.templates), size, device,
                    dtype, e.batch_size).items()})
            extra, _ = run_evaluations(
                model, {"zeroshot": e.zeroshot_datasets, "retrieval": e.retrieval_datasets,
                        "linear_probe": e.linear_probe},
                templates=e.templates, image_size=size, device=device, dtype=dtype, max_per_class=e.max_per_class,
                max_images=e.max_images, retrieval_k=e.retrieval_k, batch_size=e.batch_size)
            metrics.update(extra)
        model.train(was_training)
        return metrics


TASKS = {"clip": ClipTask, "classify": ClassifyTask, "cbmf": CBMFTask}


def load_export(folder: str, map_location="cpu"):
    """Rebuild a model exported by the engine (config.yaml + model.safetensors), offline."""
    import yaml
    from safetensors.torch import load_model
    from .config import config_from_dict

    with open(os.path.join(folder, "config.yaml")) as f:
        tree = yaml.safe_load(f)
    model_tree = tree["model"]
    if tree.get("task", "clip") == "clip" and model_tree["text"]["source"] == "hf":
        model_tree["text"]["name"] = os.path.join(folder, model_tree["text"]["name"])
    for mod in model_tree.get("modalities", []):
        if mod["kind"] == "text" and mod["tower"].get("source", "hf") == "hf":
            mod["tower"]["name"] = os.path.join(folder, mod["tower"]["name"])
    cfg = config_from_dict(tree, check=False)  # the training data need not be on this machine
    model = TASKS[cfg.task].model_from_config(cfg)
    load_model(model, os.path.join(folder, "model.safetensors"), device=str(map_location))
    return model.eval()


def build_task(cfg: Config):
    return TASKS[cfg.task](cfg)

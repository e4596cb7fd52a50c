"""Task cbmf: CBMF's Deep Fusion Encoder over frozen towers."""
from __future__ import annotations

import numpy as np

from ..data.features import cached_features, split_pairs
from ..data.images import load_splits
from ..data.labelled import ArrayDataset, collate_arrays
from ..data.batches import BatchStream
from ..dist import current_device, gather_outputs
from ..eval import predict
from ..files import RunDir
from ..losses import soft_target_contrastive_loss
from ..models import CBMF
from ..models.layers import eval_mode
from ..seeds import numpy_rng
from .base import Progress, Task, image_text_evaluation


class CBMFTask(Task):
    """CBMF: two frozen towers, trained projections g_m, context embeddings and one shared Deep
    Fusion Encoder, aligned with the soft-target contrastive loss (eq. 3-6; loss.cbmf_targets
    picks soft, soft_detached or the authors' code's hard targets) and a learnable temperature.
    model.dfe.fusion none is the heads-only baseline over the same cached features.

    The towers' outputs over the training pairs and the validation pairs (a data.val_fraction
    share of the training images, seeded) are computed once into data.feature_cache
    (mmscale/data/features.py), so training steps read cached features and never run the towers.
    Evaluation: val/loss on the cached validation features, plus for an image+text pair
    zero-shot on the held-out split and the eval.* data sets, with the towers run live.
    For a text-text pair both towers read the caption.
    """

    shared_outputs = ("logit_scale",)

    def __init__(self, cfg, logger=None):
        super().__init__(cfg, logger)
        self.names = [m.name for m in cfg.model.modalities]
        self.splits, self.cache = None, {}

    def build_model(self) -> CBMF:
        return CBMF(self.cfg.model)

    def _splits(self) -> dict:
        if self.splits is None:
            d = self.cfg.data
            s = load_splits(d)
            train, val = split_pairs(s.train, d.val_fraction, d.seed)
            self.splits = {"train": train, "val": val, "heldout": s.eval, "classnames": s.classnames}
        return self.splits

    def features(self, model: CBMF, split: str, device=None) -> ArrayDataset | None:
        """The cached tower outputs of a split ("train", "val") as an ArrayDataset (None if empty)."""
        if split not in self.cache:
            samples = self._splits()[split]
            self.cache[split] = None
            if samples:
                folder = self.cfg.data.feature_cache or RunDir(self.cfg.train.run_dir).features
                arrays, labels, _ = cached_features(
                    model, self.cfg.model, samples, split, folder, device or current_device(),
                    self.cfg.eval.batch_size, log=lambda info: self.logger.log({"event": "features", **info}))
                self.cache[split] = ArrayDataset(arrays, labels)
        return self.cache[split]

    def train_stream(self, model: CBMF, rank: int, world: int):
        train = self.features(model, "train")
        self.features(model, "val")  # cached now too, while the towers sit on the device
        d = self.cfg.data
        return BatchStream(train, collate_arrays, self.cfg.train.global_batch_size, rank, world, seed=d.seed,
                           num_workers=d.num_workers)

    def loss(self, out: dict, batch: dict, progress: Progress):
        out = gather_outputs(out, self.shared_outputs)
        a, b = self.names
        loss = soft_target_contrastive_loss(out[a], out[b], out["logit_scale"], self.cfg.loss.cbmf_targets,
                                            self.cfg.loss.cbmf_target_scale)
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
        order = numpy_rng("val_batches", self.cfg.data.seed).permutation(n)
        chunks = np.array_split(order, max(1, round(n / self.cfg.train.global_batch_size)))
        targets, target_scale = self.cfg.loss.cbmf_targets, self.cfg.loss.cbmf_target_scale
        return sum(len(c) / n * soft_target_contrastive_loss(out[a][c], out[b][c], scale, targets, target_scale).item()
                   for c in chunks)

    def evaluate(self, model: CBMF, device, dtype) -> dict:
        metrics = {}
        with eval_mode(model):
            loss = self.val_loss(model, device, dtype)
        if loss is not None:
            metrics["val/loss"] = loss
        if sorted(m.kind for m in self.cfg.model.modalities) == ["image", "text"]:
            s = self._splits()
            metrics.update(image_text_evaluation(self.cfg, model, s["heldout"], s["classnames"], device, dtype))
        return metrics

"""Task classify: supervised multimodal classification (UniS-MMC, M3CoL and the baselines)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ConfigError, image_size
from ..data.labelled import LabelledSplits, collate_arrays, load_imagetext, load_multiview
from ..data.batches import BatchStream, Collate
from ..dist import gather_outputs, global_index, rank_and_world
from ..eval import classification_metrics, predict
from ..losses import m3co_loss, mixup_cross_entropy, multisoftclip_loss, pair_categories, unis_mmc_loss
from ..models import FusionClassifier, build_model
from ..models.layers import blend, draw_mixing, eval_mode
from ..seeds import seed_torch
from .base import Progress, Task


class ClassifyTask(Task):
    """The fused prediction's cross-entropy, the unimodal heads' cross-entropies and a
    contrastive term between the modality embeddings:

        L = CE(fused) + unimodal_weight * sum_m CE(m) + contrastive_weight * L_contrastive

    loss.contrastive picks the method: unis_mmc (UniS-MMC), m3co or multisoftclip, or m3col
    (M3Co for the first m3co_fraction of the steps, then MultiSoftClip); none with unimodal heads
    is UniConcat; loss.mixup trains the fused head on mixed inputs with mixed labels (the mixup
    baseline); one modality with unimodal_weight 0 is the unimodal baseline. The options named
    after the authors' code (loss.m3co_mix, m3co_draws, m3co_mix_prob, contrastive_pairs,
    multisoftclip_reverse, multisoftclip_tau, unis_mmc_logits) are documented in mmscale/losses/finetune.py
    and mmscale/config/schema.py; their defaults are the papers' equations. With UniS-MMC the loss also
    reports the shares of positive, semi-positive and negative pairs (pairs_positive, ...).

    Mixing partners (M3Co, mixup) are drawn over the global batch, the same permutation on every
    rank from the step's seed, wherever the mixed quantity is cheap to exchange: tabular inputs
    (all-gathered without gradients) and embeddings (loss.m3co_mix: embeddings, mixed after the
    loss's gather); 1 and W ranks then give the same gradients. Where a mixed modality is a raw
    image or text input, each rank draws partners within its own rows (per-rank seed), so W ranks
    are not the one-process run; the start-up log says which (event "mixing").
    """

    def __init__(self, cfg, logger=None):
        super().__init__(cfg, logger)
        self.data = None

    def _data(self) -> LabelledSplits:
        if self.data is None:
            d = self.cfg.data
            if d.type == "multiview":
                self.data = load_multiview(d, self.cfg.model.modalities, d.seed)
            else:
                # a text-only model still decodes the images it does not read: any size will do
                self.data = load_imagetext(d, image_size(self.cfg.model) or 224, d.seed)
        return self.data

    def mix_scope(self) -> str:
        """global: partners drawn over the global batch; rank: within each rank's rows (see above)."""
        c, mods = self.cfg.loss, self.cfg.model.modalities
        cheap = (not c.mixup and c.m3co_mix == "embeddings") or all(m.kind == "tabular" for m in mods)
        return "global" if cheap else "rank"

    def mixes(self) -> bool:
        return self.cfg.loss.mixup or self.cfg.loss.contrastive in ("m3co", "m3col")

    def build_model(self) -> FusionClassifier:
        if self.mixes():
            scope = self.mix_scope()
            self.logger.log({"event": "mixing", "scope": scope, "message": (
                "mixing partners drawn over the global batch (same on every rank)" if scope == "global" else
                "mixing partners drawn within each rank's rows (raw image/text inputs): more than one rank "
                "is not the one-process run")})
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
        return build_model(self.cfg)

    def contrastive_phase(self, progress: Progress) -> str:
        c = self.cfg.loss
        if c.contrastive != "m3col":
            return c.contrastive
        return "m3co" if progress.step < c.m3co_fraction * progress.total_steps else "multisoftclip"

    def mix_mode(self, progress: Progress) -> str:
        """What the model mixes in this step: M3Co's mixed embeddings, or the mixup baseline's
        inputs (all modalities with one permutation)."""
        if self.cfg.loss.mixup:
            return "mixup"
        return "m3co" if self.contrastive_phase(progress) == "m3co" else "none"

    def collate(self, model):
        if self.cfg.data.type == "multiview":
            return collate_arrays
        kinds = {m.kind: m.name for m in self.cfg.model.modalities}
        text = kinds.get("text")
        return Collate(model.tower(text).tokenize_fn() if text else None, image_key=kinds.get("image"),
                       text_prefix=f"{text}/" if text else None)

    def train_stream(self, model, rank: int, world: int):
        d = self.cfg.data
        return BatchStream(self._data().train, self.collate(model), self.cfg.train.global_batch_size, rank, world,
                           seed=d.seed, num_workers=d.num_workers)

    def forward(self, model, batch: dict, progress: Progress) -> dict:
        c, mode = self.cfg.loss, self.mix_mode(progress)
        if mode == "none":
            return model(batch)
        draws, prob = (c.m3co_draws, c.m3co_mix_prob) if mode == "m3co" else ("shared", 1.0)
        if self.mix_scope() == "rank":  # the model draws over this rank's rows (per-rank seed)
            if mode == "mixup":
                return model(batch, mix=mode)
            return model(batch, mix=mode, draws=draws, at=c.m3co_mix, prob=prob)
        # the global batch's draws, identical on every rank; this rank's rows are its slice
        names, device = [m.name for m in self.cfg.model.modalities], batch["label"].device
        rank, world = rank_and_world()
        rows = len(batch["label"])
        mine = slice(rank * rows, (rank + 1) * rows)
        with torch.random.fork_rng(devices=[]):
            seed_torch("global_step", self.cfg.train.seed, progress.step)
            drawn = draw_mixing(names, rows * world, c.mixup_alpha, draws, prob)
        drawn = {n: (perm[mine].to(device), lam[mine].to(device)) for n, (perm, lam) in drawn.items()}
        if mode == "m3co" and c.m3co_mix == "embeddings":  # mixed after the loss's gather
            out = model(batch)
            for n, (perm, lam) in drawn.items():
                out.update({f"mix_perm/{n}": perm, f"mix_lambda/{n}": lam})
            return out
        pool = gather_outputs({n: batch[n] for n in names})  # tabular inputs of every rank, on the device
        partners = {n: (pool[n][perm], perm, lam) for n, (perm, lam) in drawn.items()}
        return model(batch, mix=mode, partners=partners)

    def loss(self, out: dict, batch: dict, progress: Progress):
        c, names = self.cfg.loss, [m.name for m in self.cfg.model.modalities]
        out = gather_outputs(out)
        labels = gather_outputs({"label": batch["label"]})["label"]
        # partner indices: already into the global batch, or each rank's own rows
        index = (lambda perm: perm) if self.mix_scope() == "global" else global_index
        if c.mixup:
            fused = mixup_cross_entropy(out["mix_logits"], labels, index(out["mix_perm"]), out["mix_lambda"])
        else:
            fused = F.cross_entropy(out["logits"].float(), labels)
        total, metrics = fused, {"loss_fused": fused.detach()}
        if c.unimodal_weight > 0:
            uni = sum(F.cross_entropy(out[f"logits/{n}"].float(), labels) for n in names)
            total = total + c.unimodal_weight * uni
            metrics["loss_unimodal"] = uni.detach()
        phase = self.contrastive_phase(progress)
        if phase != "none":
            emb = [out[f"emb/{n}"] for n in names]
            if phase == "unis_mmc":
                logits = [out[f"logits/{n}"] for n in names]
                term = unis_mmc_loss(emb, logits, labels, c.tau, form=c.unis_mmc_logits)
                metrics.update({f"pairs_{k}": v for k, v in pair_categories(logits, labels).items()})
            elif phase == "m3co":
                perms = [index(out[f"mix_perm/{n}"]) for n in names]
                lams = [out[f"mix_lambda/{n}"] for n in names]
                mixed = [blend(e, e[p], lam) for e, p, lam in zip(emb, perms, lams)] \
                    if f"mix_emb/{names[0]}" not in out else [out[f"mix_emb/{n}"] for n in names]
                # modality m's mixed anchor is matched to its own partners perm_m (eq. 6: j, eq. 7: k)
                term = m3co_loss(mixed, emb, perms, lams, c.tau, pairs=c.contrastive_pairs)
            else:
                term = multisoftclip_loss(emb, c.multisoftclip_tau or c.tau, pairs=c.contrastive_pairs,
                                          reverse=c.multisoftclip_reverse)
            total = total + c.contrastive_weight * term
            metrics[f"loss_{phase}"] = term.detach()
        return total, metrics

    def evaluate(self, model, device, dtype) -> dict:
        """ACC, F1, AUC, weighted and macro F1 and the loss of the fused prediction, and each
        unimodal head's accuracy, on the validation and test splits (val/..., test/...)."""
        data, names = self._data(), [m.name for m in self.cfg.model.modalities]
        metrics = {}
        with eval_mode(model):
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
        return metrics

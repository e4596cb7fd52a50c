"""The losses, as functions of model outputs (and labels) only: the dual encoder's symmetric
InfoNCE (CMLA eq. 5-8) and SigLIP over the batch gathered from all ranks, with one or several
positives per row (contrastive.py; their tiled and ring forms in blocks.py); the fine-tuning
losses, CBMF's soft-target loss, UniS-MMC, M3Co and MultiSoftClip (M3CoL), mixup cross-entropy
(finetune.py), which take the already gathered batch (dist.gather_outputs), the `global`
convention below.

CLIP features are expected L2-normalised and logit_scale is the multiplier exp(log(1/tau)),
as in open_clip's ClipLoss, so the two agree on the same inputs.

Distributed gradient convention (DeepSpeed/DDP average parameter gradients over ranks):
- global: every rank computes the same full B x B loss L. The gather's backward sums the
  gradient every rank sends to our rows, i.e. W * dL/dz_local; after the 1/W averaging
  the parameters get exactly dL/dtheta.
- local: rank r computes L_r on its own rows against all columns; the global loss is
  mean_r L_r. The gather's backward gives sum_r dL_r/dz_local and averaging gives dL/dtheta.
Either way the parameter gradients equal a single-process full-batch step. SigLIP's loss is
local in the same sense (each rank's rows against every column).

Tiling (loss.tile = N): the logits exist one N x N block at a time, in the forward (an online
log-sum-exp, or a running sum for SigLIP) and again in the backward (each block recomputed from
the embeddings and its gradient added to theirs), so the loss's memory is the embeddings, their
gradients and one block, whatever the batch.
"""
from .contrastive import clip_loss, contrastive_loss, siglip_loss
from .finetune import (m3co_loss, mixup_cross_entropy, mixup_targets, multisoftclip_loss, ordered_pairs,
                       pair_categories, soft_cross_entropy, soft_target_contrastive_loss, unis_mmc_loss)

__all__ = ["clip_loss", "contrastive_loss", "siglip_loss", "m3co_loss", "mixup_cross_entropy", "mixup_targets",
           "multisoftclip_loss", "ordered_pairs", "pair_categories", "soft_cross_entropy",
           "soft_target_contrastive_loss", "unis_mmc_loss"]

"""The losses, as functions of model outputs (and labels) only: symmetric InfoNCE (CMLA eq. 5-8)
over the batch gathered from all ranks; CBMF's soft-target loss; UniS-MMC; M3Co and
MultiSoftClip (M3CoL); mixup cross-entropy. Fine-tuning losses take the already gathered batch
(dist.gather_outputs), the `global` convention below.

CLIP features are expected L2-normalised and logit_scale is the multiplier exp(log(1/tau)),
as in open_clip's ClipLoss, so the two agree on the same inputs.

Distributed gradient convention (DeepSpeed/DDP average parameter gradients over ranks):
- global: every rank computes the same full B x B loss L. The gather's backward sums the
  gradient every rank sends to our rows, i.e. W * dL/dz_local; after the 1/W averaging
  the parameters get exactly dL/dtheta.
- local: rank r computes L_r on its own rows against all columns; the global loss is
  mean_r L_r. The gather's backward gives sum_r dL_r/dz_local and averaging gives dL/dtheta.
Either way the parameter gradients equal a single-process full-batch step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dist import all_gather_with_grad, rank_and_world


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     variant: str = "global") -> torch.Tensor:
    """Symmetric InfoNCE over the global batch gathered from all ranks.

    image, text: this rank's [n, d] normalised embeddings; logit_scale: 1/tau (shape [] or [1]).
    """
    rank, world = rank_and_world()
    image, text = image.float(), text.float()
    scale = logit_scale.float().reshape(())
    all_image = all_gather_with_grad(image)
    all_text = all_gather_with_grad(text)
    if variant == "local":
        logits_per_image = scale * image @ all_text.T
        logits_per_text = scale * text @ all_image.T
        labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    elif variant == "global":
        logits_per_image = scale * all_image @ all_text.T
        logits_per_text = logits_per_image.T
        labels = torch.arange(all_image.shape[0], device=image.device)
    else:
        raise ValueError(f"loss.variant: {variant!r} is not global or local")
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j t_ij log softmax(logits_i)_j."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def soft_target_contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CBMF eq. 3-6, for the L2-normalised embeddings of the two modalities.

    S = a b^T / tau (eq. 3); intra-modal similarities a a^T and b b^T (eq. 4) give soft targets
    T = softmax((a a^T + b b^T) / (2 tau)) row-wise (eq. 5); L = 1/2 [CE(S, T) + CE(S^T, T^T)] (eq. 6).
    Pairs of samples that are alike within both modalities share target mass, so near-duplicates
    are not pushed apart as hard negatives.
    """
    a, b = a.float(), b.float()
    scale = logit_scale.float().reshape(())
    logits = scale * a @ b.T
    targets = F.softmax(scale * (a @ a.T + b @ b.T) / 2, dim=-1)
    return 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.T, targets.T))


def unis_mmc_loss(embeddings: list[torch.Tensor], logits: list[torch.Tensor], labels: torch.Tensor,
                  tau: float = 0.07) -> torch.Tensor:
    """UniS-MMC's unimodality-supervised multimodal contrastive loss, summed over modality pairs.

    For a pair of modalities (m, n) and sample i, the unimodal predictions decide the pair
    (r_i^m, r_i^n): positive if both are right, semi-positive if exactly one is (the right
    modality's representation is detached, so only the wrong one moves towards it), negative if
    both are wrong. With s_i = cos(r_i^m, r_i^n) / tau:

        L_mn = -log( sum_{i in P u SP} exp(s_i) / sum_i exp(s_i) )

    pulls positive and semi-positive pairs together against the negative ones; a batch without
    any positive or semi-positive pair contributes 0. L = sum_{m < n} L_mn.
    """
    correct = [lg.argmax(-1) == labels for lg in logits]
    total = embeddings[0].new_zeros(())
    for m in range(len(embeddings)):
        for n in range(m + 1, len(embeddings)):
            cm, cn = correct[m], correct[n]
            # detach the right one of a semi-positive pair
            rm = torch.where((cm & ~cn)[:, None], embeddings[m].detach(), embeddings[m]).float()
            rn = torch.where((cn & ~cm)[:, None], embeddings[n].detach(), embeddings[n]).float()
            s = F.cosine_similarity(rm, rn, dim=-1) / tau
            keep = cm | cn
            if keep.any():
                total = total + torch.logsumexp(s, 0) - torch.logsumexp(s[keep], 0)
    return total


def m3co_loss(mixed: list[torch.Tensor], clean: list[torch.Tensor], perms: list[torch.Tensor],
              lambdas: list[torch.Tensor], tau: float = 0.1) -> torch.Tensor:
    """M3CoL's mixup contrastive loss (M3Co, eq. 6-8), summed over ordered modality pairs.

    Modality m's input of sample i is mixed with that of sample k = perm_m[i] with weight
    lambda_i; its embedding p~_i must then match the other modality's clean embeddings of i and
    k in those proportions. With softmax over the candidates j of q_j^n:

        l(m->n) = -1/N sum_i [ lambda_i log sigma(p~_i . q_i / tau) + (1 - lambda_i) log sigma(p~_i . q_k / tau) ]

    (eq. 6 for m = 1, eq. 7 for m = 2); L = sum_{m != n} l(m->n) (eq. 8, all pairs for M > 2).
    Embeddings are L2-normalised here.
    """
    total = mixed[0].new_zeros((), dtype=torch.float32)
    for m in range(len(mixed)):
        p = F.normalize(mixed[m].float(), dim=-1)
        n_rows = p.shape[0]
        targets = torch.zeros(n_rows, n_rows, device=p.device)
        rows = torch.arange(n_rows, device=p.device)
        lam = lambdas[m].float()
        targets[rows, rows] += lam
        targets[rows, perms[m]] += 1 - lam  # a sample mixed with itself keeps target 1
        for n in range(len(clean)):
            if n != m:
                q = F.normalize(clean[n].float(), dim=-1)
                total = total + soft_cross_entropy(p @ q.T / tau, targets)
    return total


def multisoftclip_loss(embeddings: list[torch.Tensor], tau: float = 0.1) -> torch.Tensor:
    """M3CoL's MultiSoftClip (eq. 9-11), summed over ordered modality pairs.

    Soft targets come from the target modality's own similarities:

        l(m->n) = -1/N sum_i sum_j softmax_j(q_i . q_j / tau) log softmax_j(p_i . q_j / tau)

    with p = normalised embeddings of m, q of n (eq. 9, 10); L = sum_{m != n} l(m->n) (eq. 11).
    """
    z = [F.normalize(e.float(), dim=-1) for e in embeddings]
    total = z[0].new_zeros(())
    for m in range(len(z)):
        for n in range(len(z)):
            if n != m:
                total = total + soft_cross_entropy(z[m] @ z[n].T / tau, F.softmax(z[n] @ z[n].T / tau, dim=-1))
    return total


def mixup_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor,
                        lam: torch.Tensor) -> torch.Tensor:
    """Input mixup (Zhang et al. 2018): lambda_i CE(f(x~_i), y_i) + (1 - lambda_i) CE(f(x~_i), y_perm(i))."""
    lam = lam.float()
    return (lam * F.cross_entropy(logits.float(), labels, reduction="none")
            + (1 - lam) * F.cross_entropy(logits.float(), labels[perm], reduction="none")).mean()

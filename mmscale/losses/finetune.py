"""The fine-tuning losses, as functions of outputs and labels: CBMF's soft-target loss, UniS-MMC,
M3Co and MultiSoftClip (M3CoL), mixup cross-entropy. They take the batch already gathered from
all ranks (dist.gather_outputs), the `global` convention of mmscale/losses/__init__.py."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j t_ij log softmax(logits_i)_j."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def soft_target_contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                                 targets: str = "soft", scale_targets: str = "divide") -> torch.Tensor:
    """CBMF eq. 3-6, for the L2-normalised embeddings of the two modalities.

    S = a b^T / tau (eq. 3: image to text, eq. 4: text to image as S^T); the intra-modal
    similarities a a^T and b b^T give soft targets T = softmax((a a^T + b b^T) / (2 tau)) row-wise
    (eq. 5); L = 1/2 [CE(S, T) + CE(S^T, T^T)] (eq. 6).

    scale_targets (loss.cbmf_target_scale): eq. 5 prints "(<x_i,x_j> + <y_i,y_j>) / 2 . tau".
    "divide" reads it as / (2 tau), the logits' own temperature (the default); "multiply" reads it
    left to right, * tau / 2 (the expression `(sim_a + sim_b) / 2 * temperature` of the CLIP
    tutorial code this loss descends from). The authors' code (b-faye/lightweightCRL,
    text_image/*/model.py, Model.forward) has no soft targets at all (see `hard` below), so it
    does not decide between the two readings.
    Pairs of samples that are alike within both modalities share target mass, so near-duplicates
    are not pushed apart as hard negatives.

    targets (loss.cbmf_targets): "soft" is eq. 5 as written, gradients through T too (the paper
    writes no stop-gradient; T then has a fixed point where every embedding is the same, see
    docs/RESULTS.md); "soft_detached" stops the gradient at T; "hard" is T = I, plain symmetric
    InfoNCE, which is what the authors' code trains with (b-faye/lightweightCRL, e.g.
    text_image/addition/model.py lines 286-291: logits * exp(t), labels = arange, both directions).
    """
    a, b = a.float(), b.float()
    scale = logit_scale.float().reshape(())
    logits = scale * a @ b.T
    if targets == "hard":
        labels = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    if targets not in ("soft", "soft_detached"):
        raise ValueError(f"loss.cbmf_targets: {targets!r} is not soft, soft_detached or hard")
    if scale_targets not in ("divide", "multiply"):
        raise ValueError(f"loss.cbmf_target_scale: {scale_targets!r} is not divide or multiply")
    sims = (a @ a.T + b @ b.T) / 2
    t = F.softmax(sims * scale if scale_targets == "divide" else sims / scale, dim=-1)
    if targets == "soft_detached":
        t = t.detach()
    return 0.5 * (soft_cross_entropy(logits, t) + soft_cross_entropy(logits.T, t.T))


def ordered_pairs(count: int, pairs: str = "all") -> list[tuple[int, int]]:
    """The ordered modality pairs (m, n) a contrastive term sums over: "all" m != n (the papers'
    sums), or "cyclic" m -> m + 1 mod M (the M3CoL authors' code for 3 views: 1->2, 2->3, 3->1;
    for two modalities both are (0, 1), (1, 0))."""
    if pairs == "all":
        return [(m, n) for m in range(count) for n in range(count) if m != n]
    if pairs == "cyclic":
        return [(m, (m + 1) % count) for m in range(count)] if count > 1 else []
    raise ValueError(f"loss.contrastive_pairs: {pairs!r} is not all or cyclic")


def pair_categories(logits: list[torch.Tensor], labels: torch.Tensor) -> dict:
    """UniS-MMC's pair categories over the batch, averaged over the modality pairs m < n:
    the share of samples whose pair is positive (both unimodal heads right), semi-positive (one
    right) and negative (both wrong)."""
    correct = [lg.argmax(-1) == labels for lg in logits]
    shares = {"positive": [], "semi_positive": [], "negative": []}
    for m in range(len(correct)):
        for n in range(m + 1, len(correct)):
            cm, cn = correct[m], correct[n]
            shares["positive"].append((cm & cn).float().mean())
            shares["semi_positive"].append((cm ^ cn).float().mean())
            shares["negative"].append((~cm & ~cn).float().mean())
    return {k: torch.stack(v).mean() for k, v in shares.items() if v}


def unis_mmc_loss(embeddings: list[torch.Tensor], logits: list[torch.Tensor], labels: torch.Tensor,
                  tau: float = 0.07, form: str = "pairs") -> torch.Tensor:
    """UniS-MMC's unimodality-supervised multimodal contrastive loss, summed over modality pairs.

    For a pair of modalities (m, n) and sample i, the unimodal predictions decide the pair
    (r_i^m, r_i^n): positive if both are right, semi-positive if exactly one is (the right
    modality's representation is detached, so only the wrong one moves towards it), negative if
    both are wrong. With s_i = cos(r_i^m, r_i^n) / tau:

        L_mn = -log( sum_{i in P u SP} exp(s_i) / sum_i exp(s_i) )

    pulls positive and semi-positive pairs together against the negative ones; a batch without
    any positive or semi-positive pair contributes 0. L = sum_{m < n} L_mn. Once every head is
    right on every sample, every pair is positive and L is exactly 0.

    form (loss.unis_mmc_logits): "pairs" is the above; "first_row" is the expression of the
    authors' code (Vincent-ZHQ/UniS-MMC, model/model.py, UniSMMConLoss): the logits are row 0 of
    the batch's cross-sample similarity matrix, s_j = cos(r_0^m, r_j^n) / tau, masked by sample
    j's category, with the mean instead of the sum over the kept samples,
    -log( sum_{j in P u SP} exp(s_j) / sum_j exp(s_j) / |P u SP| ); a batch with no positive or
    semi-positive pair gives the constant log N (every sample kept, every representation detached).
    """
    if form not in ("pairs", "first_row"):
        raise ValueError(f"loss.unis_mmc_logits: {form!r} is not pairs or first_row")
    correct = [lg.argmax(-1) == labels for lg in logits]
    total = embeddings[0].new_zeros((), dtype=torch.float32)
    for m in range(len(embeddings)):
        for n in range(m + 1, len(embeddings)):
            cm, cn = correct[m], correct[n]
            keep = cm | cn
            # detach the right one of a semi-positive pair
            rm = torch.where((cm & ~cn)[:, None], embeddings[m].detach(), embeddings[m]).float()
            rn = torch.where((cn & ~cm)[:, None], embeddings[n].detach(), embeddings[n]).float()
            if form == "pairs":
                if keep.any():
                    s = F.cosine_similarity(rm, rn, dim=-1) / tau
                    total = total + torch.logsumexp(s, 0) - torch.logsumexp(s[keep], 0)
                continue
            if not keep.any():
                total = total + math.log(len(keep))
                continue
            s = F.normalize(rm[0], dim=-1) @ F.normalize(rn, dim=-1).T / tau
            total = total + torch.logsumexp(s, 0) - torch.logsumexp(s[keep], 0) + torch.log(keep.sum().float())
    return total


def mixup_targets(perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """T_ij = lambda_i [j = i] + (1 - lambda_i) [j = perm_i]: where the mixed sample i's match lies
    among the clean candidates j (a sample mixed with itself keeps target 1)."""
    n = len(perm)
    rows = torch.arange(n, device=perm.device)
    t = torch.zeros(n, n, device=perm.device)
    lam = lam.float()
    t[rows, rows] += lam
    t[rows, perm] += 1 - lam
    return t


def m3co_loss(mixed: list[torch.Tensor], clean: list[torch.Tensor], perms: list[torch.Tensor],
              lambdas: list[torch.Tensor], tau: float = 0.1, pairs: str = "all") -> torch.Tensor:
    """M3CoL's mixup contrastive loss M3Co (eq. 6-8, 12), summed over ordered modality pairs.

    Modality m's sample i is mixed with sample k = perm_m[i] with weight lambda_i (eq. 2: one
    lambda_i for all modalities, the partner drawn per modality, j for modality 1 and k for
    modality 2; layers.draw_mixing draws them); the targets of modality m's mixed anchor come from
    its own perm_m (eq. 6: p_j^(2) for the mixed modality 1, eq. 7: p_k^(1) for the mixed modality
    2). Its embedding p~_i must match the other modality's clean embeddings q_i and q_k in those
    proportions, and each clean q_j must find, among all the mixed p~, the samples it was mixed
    into. With S = p~ q^T / tau (rows and columns L2-normalised) and T_ij = lambda_i [j = i] +
    (1 - lambda_i) [j = k_i]:

        mixed anchor (eq. 6, 7, first terms):  -1/N sum_i sum_j T_ij log softmax_j(S_i.)
        clean anchor (eq. 6, 7, the reverse):  -1/N sum_j sum_i T_ij log softmax_i(S_.j)
                                              (CE of S^T against the transposed targets T^T)
        l(m -> n) = 1/2 [mixed anchor + clean anchor]              (the 1/2 of eq. 8)
        L = sum over ordered pairs (m, n), m != n, of l(m -> n)    (eq. 8; eq. 12 for M > 2)

    pairs (loss.contrastive_pairs): "all" as above; "cyclic" is the authors' ROSMAP code
    (model/model_med.py: 1 -> 2, 2 -> 3, 3 -> 1 only). Embeddings are L2-normalised here.
    """
    total = mixed[0].new_zeros((), dtype=torch.float32)
    for m, n in ordered_pairs(len(mixed), pairs):
        p = F.normalize(mixed[m].float(), dim=-1)
        q = F.normalize(clean[n].float(), dim=-1)
        s, t = p @ q.T / tau, mixup_targets(perms[m], lambdas[m])
        total = total + 0.5 * (soft_cross_entropy(s, t) + soft_cross_entropy(s.T, t.T))
    return total


def multisoftclip_loss(embeddings: list[torch.Tensor], tau: float = 0.1, pairs: str = "all",
                       reverse: str = "transposed") -> torch.Tensor:
    """M3CoL's MultiSoftClip (eq. 9-11; eq. 13 for M > 2), summed over ordered modality pairs.

    Soft targets come from the target modality's own similarities: with p = normalised
    embeddings of m, q of n, S = p q^T / tau and T = softmax_rows(q q^T / tau),

        forward (eq. 9, 10):  -1/N sum_i sum_j T_ij log softmax_j(S_i.)
        reverse:              -1/N sum_j sum_i T_ij log softmax_i(S_.j)   (S^T against T^T)
        l(m -> n) = 1/2 [forward + reverse] (the 1/2 of eq. 11);
        L = sum over ordered m != n of l(m -> n)    (eq. 11; eq. 13 for M > 2)

    reverse (loss.multisoftclip_reverse): "transposed" as above; "rows" is the authors' code
    (model/utils.py, soft_clip_loss), whose reverse term reads T's rows, CE(S^T, T), i.e. anchor
    q_j's targets softmax_i(q_j . q_i / tau). pairs: as in m3co_loss.
    """
    if reverse not in ("transposed", "rows"):
        raise ValueError(f"loss.multisoftclip_reverse: {reverse!r} is not transposed or rows")
    z = [F.normalize(e.float(), dim=-1) for e in embeddings]
    total = z[0].new_zeros(())
    for m, n in ordered_pairs(len(z), pairs):
        s, t = z[m] @ z[n].T / tau, F.softmax(z[n] @ z[n].T / tau, dim=-1)
        total = total + 0.5 * (soft_cross_entropy(s, t) + soft_cross_entropy(s.T, t.T if reverse == "transposed" else t))
    return total


def mixup_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor,
                        lam: torch.Tensor) -> torch.Tensor:
    """Input mixup (Zhang et al. 2018): lambda_i CE(f(x~_i), y_i) + (1 - lambda_i) CE(f(x~_i), y_perm(i))."""
    lam = lam.float()
    return (lam * F.cross_entropy(logits.float(), labels, reduction="none")
            + (1 - lam) * F.cross_entropy(logits.float(), labels[perm], reduction="none")).mean()

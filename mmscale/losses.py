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
Either way the parameter gradients equal a single-process full-batch step. SigLIP's loss is
local in the same sense (each rank's rows against every column).

Tiling (loss.tile = N): the logits exist one N x N block at a time, in the forward (an online
log-sum-exp, or a running sum for SigLIP) and again in the backward (each block recomputed from
the embeddings and its gradient added to theirs), so the loss's memory is the embeddings, their
gradients and one block, whatever the batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dist import all_gather_with_grad, other_ranks_blocks, rank_and_world, ring_pass


def _blocks(n: int, tile: int) -> list[slice]:
    return [slice(i, min(i + tile, n)) for i in range(0, n, tile)]


class _TiledLogSumExp(torch.autograd.Function):
    """The row log-sum-exps of S = scale * a @ b.T ([m]), and with `columns` its column
    log-sum-exps too ([m + k] in all), computed one tile x tile block of S at a time.

    Forward: per block, logaddexp of the running value and the block's own log-sum-exp (an online
    log-sum-exp: exact, and never more than one block of S). Backward: with g the incoming
    gradient, dS_ij = g_i softmax_j(S_i.) + g'_j softmax_i(S_.j) is formed block by block from the
    recomputed block and the saved log-sum-exps, and pushed into a, b and scale."""

    @staticmethod
    def forward(ctx, a, b, scale, tile: int, columns: bool):
        m, k = a.shape[0], b.shape[0]
        rows = a.new_full((m,), -math.inf)
        cols = a.new_full((k,), -math.inf) if columns else a.new_empty(0)
        for i in _blocks(m, tile):
            for j in _blocks(k, tile):
                s = scale * (a[i] @ b[j].T)
                rows[i] = torch.logaddexp(rows[i], s.logsumexp(1))
                if columns:
                    cols[j] = torch.logaddexp(cols[j], s.logsumexp(0))
        ctx.tile, ctx.columns = tile, columns
        ctx.save_for_backward(a, b, scale, rows, cols)
        return torch.cat([rows, cols])

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, rows, cols = ctx.saved_tensors
        m, k = a.shape[0], b.shape[0]
        g_rows, g_cols = grad[:m], grad[m:]
        da, db, dscale = torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(scale)
        for i in _blocks(m, ctx.tile):
            for j in _blocks(k, ctx.tile):
                dots = a[i] @ b[j].T
                s = scale * dots
                ds = g_rows[i, None] * (s - rows[i, None]).exp()
                if ctx.columns:
                    ds += g_cols[None, j] * (s - cols[None, j]).exp()
                da[i] += scale * (ds @ b[j])
                db[j] += scale * (ds.T @ a[i])
                dscale += (ds * dots).sum()
        return da, db, dscale, None, None


# One block of pairs, a's rows against b's, in tiles, without autograd: the value and the
# gradients (added into da, db) of either the rows' log-sum-exps ("lse") or the sum of
# softplus(S + bias) ("softplus", SigLIP). The tiled and ring functions below are built on these.

def _block_value(kind: str, a, b, scale, bias, tile: int) -> torch.Tensor:
    out = a.new_full((a.shape[0],), -math.inf) if kind == "lse" else a.new_zeros(())
    for i in _blocks(a.shape[0], tile):
        for j in _blocks(b.shape[0], tile):
            s = scale * (a[i] @ b[j].T)
            if kind == "lse":
                out[i] = torch.logaddexp(out[i], s.logsumexp(1))
            else:
                out += F.softplus(s + bias).sum()
    return out


def _block_grads(kind: str, a, b, scale, bias, value, grad, tile: int, da, db) -> tuple:
    """Adds the block's gradients into da and db; returns those of scale and bias."""
    dscale, dbias = torch.zeros_like(scale), torch.zeros_like(bias)
    for i in _blocks(a.shape[0], tile):
        for j in _blocks(b.shape[0], tile):
            dots = a[i] @ b[j].T
            if kind == "lse":  # d logsumexp_j(S_ij) / dS_ij = softmax_j(S_i.)
                ds = grad[i, None] * (scale * dots - value[i, None]).exp()
            else:
                ds = grad * torch.sigmoid(scale * dots + bias)
                dbias += ds.sum()
            da[i] += scale * (ds @ b[j])
            db[j] += scale * (ds.T @ a[i])
            dscale += (ds * dots).sum()
    return dscale, dbias


class _TiledSoftplusSum(torch.autograd.Function):
    """sum_ij softplus(scale * a_i . b_j + bias), one tile x tile block at a time (SigLIP's sum
    over all pairs taken as negatives); the backward recomputes each block, dS = sigmoid(S)."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, tile: int):
        ctx.tile = tile
        ctx.save_for_backward(a, b, scale, bias)
        return _block_value("softplus", a, b, scale, bias, tile)

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, bias = ctx.saved_tensors
        da, db = torch.zeros_like(a), torch.zeros_like(b)
        dscale, dbias = _block_grads("softplus", a, b, scale, bias, None, grad, ctx.tile, da, db)
        return da, db, dscale, dbias, None


class _RingRows(torch.autograd.Function):
    """This rank's rows a against every rank's columns c, with only one other rank's block of c
    held at a time: the blocks travel round the ring (dist.ring_pass), and in the backward they
    travel round again with a gradient accumulator each rank adds its share to, then go home.
    kind "lse": the rows' log-sum-exps over all columns ([n]); "softplus": SigLIP's
    sum_ij softplus(S_ij + bias) (a scalar). W - 1 passes forward, W backward, each block in
    tiles; nothing gathered, nothing saved but this rank's own a, c and the result."""

    @staticmethod
    def forward(ctx, kind: str, a, c, scale, bias, tile: int):
        world = rank_and_world()[1]
        tile = tile or max(a.shape[0], c.shape[0])
        block, acc = c, None
        for step in range(world):
            if step:
                block = ring_pass(block)
            part = _block_value(kind, a, block, scale, bias, tile)
            acc = part if acc is None else (torch.logaddexp(acc, part) if kind == "lse" else acc + part)
        ctx.kind, ctx.tile = kind, tile
        ctx.save_for_backward(a, c, scale, bias, acc)
        return acc

    @staticmethod
    def backward(ctx, grad):
        a, c, scale, bias, acc = ctx.saved_tensors
        world = rank_and_world()[1]
        da = torch.zeros_like(a)
        dscale, dbias = torch.zeros_like(scale), torch.zeros_like(bias)
        block, dblock = c, torch.zeros_like(c)
        for step in range(world):
            if step:  # rank r now holds rank r - step's block and the shares of ranks r - step .. r - 1
                both = ring_pass(torch.cat([block, dblock]))
                block, dblock = both[:c.shape[0]], both[c.shape[0]:]
            g_scale, g_bias = _block_grads(ctx.kind, a, block, scale, bias, acc, grad, ctx.tile, da, dblock)
            dscale, dbias = dscale + g_scale, dbias + g_bias
        # the block last held is rank r + 1's, with every rank's share: one more pass takes each home
        return None, da, ring_pass(dblock), dscale, dbias, None


def _logsumexp(a, b, scale, tile: int, columns: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row (and column) log-sum-exps of scale * a @ b.T: whole (tile 0) or tiled."""
    if tile:
        out = _TiledLogSumExp.apply(a, b, scale, tile, columns)
        return out[:a.shape[0]], (out[a.shape[0]:] if columns else None)
    s = scale * a @ b.T
    return s.logsumexp(1), (s.logsumexp(0) if columns else None)


def _positives(a, b, scale, offset: int = 0) -> torch.Tensor:
    """scale * a_i . b_(offset + i): the logits of the matching pairs, without forming S."""
    return scale * (a * b[offset:offset + a.shape[0]]).sum(-1)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     variant: str = "global", tile: int = 0) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch gathered from all ranks.

    image, text: this rank's [n, d] normalised embeddings; logit_scale: 1/tau (shape [] or [1]).
    tile > 0: the same loss and gradients from tile x tile blocks of the logits (no B x B matrix):
    CE_i = logsumexp_j(S_ij) - S_ii, with the log-sum-exps accumulated block by block.
    variant "ring": the local loss, with the other ranks' embeddings passed round the ring one
    block at a time instead of all-gathered (nothing larger than a rank's own block is held).
    """
    rank, world = rank_and_world()
    image, text = image.float(), text.float()
    scale = logit_scale.float().reshape(())
    if variant != "ring":
        all_image = all_gather_with_grad(image)
        all_text = all_gather_with_grad(text)
    if variant not in ("global", "local", "ring"):
        raise ValueError(f"loss.variant: {variant!r} is not global, local or ring")
    if variant == "ring":  # local rows; the other ranks' embeddings come round the ring, never gathered
        zero = scale.new_zeros(())
        i2t = _RingRows.apply("lse", image, text, scale, zero, tile)
        t2i = _RingRows.apply("lse", text, image, scale, zero, tile)
        return 0.5 * (i2t.mean() + t2i.mean()) - _positives(image, text, scale).mean()
    if tile:
        if variant == "global":  # one pass over the blocks gives both directions
            rows, cols = _logsumexp(all_image, all_text, scale, tile, columns=True)
            return 0.5 * (rows.mean() + cols.mean()) - _positives(all_image, all_text, scale).mean()
        offset = rank * image.shape[0]
        i2t, _ = _logsumexp(image, all_text, scale, tile, columns=False)
        t2i, _ = _logsumexp(text, all_image, scale, tile, columns=False)
        return (0.5 * (i2t.mean() + t2i.mean())
                - 0.5 * (_positives(image, all_text, scale, offset).mean() + _positives(text, all_image, scale, offset).mean()))
    if variant == "local":
        logits_per_image = scale * image @ all_text.T
        logits_per_text = scale * text @ all_image.T
        labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    else:
        logits_per_image = scale * all_image @ all_text.T
        logits_per_text = logits_per_image.T
        labels = torch.arange(all_image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def _softplus_sum(a, b, scale, bias, tile: int) -> torch.Tensor:
    if tile:
        return _TiledSoftplusSum.apply(a, b, scale, bias, tile)
    return F.softplus(scale * a @ b.T + bias).sum()


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                exchange: str = "bidir", tile: int = 0) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, eq. 1 / Algorithm 1) for this rank's rows:

        L = -1/n sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)),  z_ij = 1 for a pair, -1 otherwise,

    over this rank's n images i and the texts j of every rank (the global loss is the mean over
    ranks, i.e. 1/|B| sum over all pairs, as the paper's). With -log sigmoid(-x) = softplus(x)
    and softplus(-x) - softplus(x) = -x it is computed as

        L = 1/n [ sum_ij softplus(x_ij) - sum_i x_ii ],  x_ij = t x_i . y_j + b,

    so the positives never need the logit matrix. exchange: "bidir" receives the other ranks'
    texts from the two ring neighbours a block per step (open_clip's default; autograd keeps every
    received block for the backward); "gather" all-gathers them; "ring" passes them round the ring
    and again in the backward, holding one other rank's block at a time. tile > 0: each block of
    pairs in tile x tile pieces."""
    if exchange not in ("bidir", "gather", "ring"):
        raise ValueError(f"loss.exchange: {exchange!r} is not bidir, gather or ring")
    world = rank_and_world()[1]
    image, text = image.float(), text.float()
    scale, bias = logit_scale.float().reshape(()), logit_bias.float().reshape(())
    if exchange == "ring":
        total = _RingRows.apply("softplus", image, text, scale, bias, tile)
    elif exchange == "gather" and world > 1:
        all_text = all_gather_with_grad(text)
        total = _softplus_sum(image, all_text, scale, bias, tile)
    else:
        total = _softplus_sum(image, text, scale, bias, tile)
        for block in other_ranks_blocks(text):
            total = total + _softplus_sum(image, block, scale, bias, tile)
    return (total - (_positives(image, text, scale) + bias).sum()) / image.shape[0]


def clip_loss(out: dict, cfg) -> torch.Tensor:
    """The dual encoder's loss that the recipe names (cfg: a ClipLossConfig)."""
    if cfg.name == "siglip":
        return siglip_loss(out["image"], out["text"], out["logit_scale"], out["logit_bias"], cfg.exchange, cfg.tile)
    return contrastive_loss(out["image"], out["text"], out["logit_scale"], cfg.variant, cfg.tile)


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

"""The dual encoder's losses: symmetric InfoNCE (CMLA eq. 5-8) and SigLIP's sigmoid loss over the
batch of all ranks, whole, tiled or passed round the ring, with one positive per row (its own
pair) or every row sharing its key (loss.positives)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dist import all_gather_with_grad, other_ranks_blocks, other_ranks_order, rank_and_world
from .blocks import Positives, columns_of, ring_rows, softplus_sum, tiled_logsumexp


def _positives(a, b, scale, offset: int = 0) -> torch.Tensor:
    """scale * a_i . b_(offset + i): the logits of the matching pairs, without forming S."""
    return scale * (a * b[offset:offset + a.shape[0]]).sum(-1)


def _keyed(keys: torch.Tensor, n: int, local: bool) -> tuple[Positives, torch.Tensor]:
    """(Positives of this rank's rows (local) or of every row (global) against every rank's
    columns; each row's count of other positives). The keys of all ranks are gathered (B
    integers); samples are numbered in rank order, as the gathered embeddings are. The counts
    come from the sorted keys (searchsorted, no unique): nothing is read back to the host."""
    if keys.shape != (n,) or keys.is_floating_point():
        raise ValueError(f"loss.positives: expected one integer key per row ({n}), got {tuple(keys.shape)} {keys.dtype}")
    rank = rank_and_world()[0]
    all_keys = all_gather_with_grad(keys.long())  # integers: gathered, nothing to differentiate
    ids = torch.arange(all_keys.shape[0], device=all_keys.device)
    ordered = all_keys.sort().values
    others = (torch.searchsorted(ordered, all_keys, right=True) - torch.searchsorted(ordered, all_keys) - 1).float()
    pos = Positives(all_keys, ids, all_keys, ids)
    if local:
        mine = slice(rank * n, (rank + 1) * n)
        return pos.rows(mine), others[mine]
    return pos, others


def _more(hits: torch.Tensor, others: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """What the mean logit over each row's positives, (own_i + hits_i) / (1 + others_i), adds to
    the row's own pair's logit own_i, averaged over the rows; exactly 0 where no row has another
    positive (hits and others are then exact zeros)."""
    return ((hits - others * own) / (1 + others)).mean()


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     variant: str = "global", tile: int = 0, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch gathered from all ranks.

    image, text: this rank's [n, d] normalised embeddings; logit_scale: 1/tau (shape [] or [1]).
    tile > 0: the same loss and gradients from tile x tile blocks of the logits (no B x B matrix):
    CE_i = logsumexp_j(S_ij) - S_ii, with the log-sum-exps accumulated block by block.
    variant "ring": the local loss, with the other ranks' embeddings passed round the ring one
    block at a time instead of all-gathered (nothing larger than a rank's own block is held).

    keys: this rank's [n] integer keys (loss.positives), or None (each row's only positive is
    its own pair). Rows sharing a key are each other's positives, and each row's term is the mean
    of -log softmax over its positives P(i) (SupCon's L_out, Khosla et al. 2020, eq. 2, as UniCL
    (Yang et al. 2022) uses it between images and texts), in both directions:

        l_i = logsumexp_j(S_ij) - 1/|P(i)| sum_{p in P(i)} S_ip

    With every key unique this is the loss without keys, bit for bit.
    """
    rank, world = rank_and_world()
    image, text = image.float(), text.float()
    scale = logit_scale.float().reshape(())
    n = image.shape[0]
    if variant not in ("global", "local", "ring"):
        raise ValueError(f"loss.variant: {variant!r} is not global, local or ring")
    if variant != "ring":
        all_image = all_gather_with_grad(image)
        all_text = all_gather_with_grad(text)
    pos, others = _keyed(keys, n, local=variant != "global") if keys is not None else (None, None)
    if variant == "ring":  # local rows; the other ranks' embeddings come round the ring, never gathered
        zero = scale.new_zeros(())
        i2t = ring_rows("lse", image, text, scale, zero, tile, pos)
        t2i = ring_rows("lse", text, image, scale, zero, tile, pos)
        own = _positives(image, text, scale)
        positive = own.mean()
        if pos is not None:
            positive = positive + 0.5 * (_more(i2t[n:], others, own) + _more(t2i[n:], others, own))
        return 0.5 * (i2t[:n].mean() + t2i[:n].mean()) - positive
    if tile:
        if variant == "global":  # one pass over the blocks gives both directions
            rows, cols, *hits = tiled_logsumexp(all_image, all_text, scale, tile, True, pos)
            own = _positives(all_image, all_text, scale)
            positive = own.mean()
            if pos is not None:
                positive = positive + 0.5 * (_more(hits[0], others, own) + _more(hits[1], others, own))
            return 0.5 * (rows.mean() + cols.mean()) - positive
        offset = rank * n
        i2t, *hits_i2t = tiled_logsumexp(image, all_text, scale, tile, False, pos)
        t2i, *hits_t2i = tiled_logsumexp(text, all_image, scale, tile, False, pos)
        own_i2t, own_t2i = _positives(image, all_text, scale, offset), _positives(text, all_image, scale, offset)
        positive = 0.5 * (own_i2t.mean() + own_t2i.mean())
        if pos is not None:
            positive = positive + 0.5 * (_more(hits_i2t[0], others, own_i2t) + _more(hits_t2i[0], others, own_t2i))
        return 0.5 * (i2t.mean() + t2i.mean()) - positive
    if variant == "local":
        logits_per_image = scale * image @ all_text.T
        logits_per_text = scale * text @ all_image.T
        labels = torch.arange(n, device=image.device) + rank * n
    else:
        logits_per_image = scale * all_image @ all_text.T
        logits_per_text = logits_per_image.T
        labels = torch.arange(all_image.shape[0], device=image.device)
    loss = 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
    if pos is None:
        return loss
    rows, mask = torch.arange(labels.shape[0], device=image.device), pos.mask()  # one key per pair: one mask both ways
    return loss - 0.5 * (_more((logits_per_image * mask).sum(1), others, logits_per_image[rows, labels])
                         + _more((logits_per_text * mask).sum(1), others, logits_per_text[rows, labels]))


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                exchange: str = "bidir", tile: int = 0, keys: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, eq. 1 / Algorithm 1) for this rank's rows:

        L = -1/n sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)),  z_ij = 1 for a pair, -1 otherwise,

    over this rank's n images i and the texts j of every rank (the global loss is the mean over
    ranks, i.e. 1/|B| sum over all pairs, as the paper's). With -log sigmoid(-x) = softplus(x)
    and softplus(-x) - softplus(x) = -x it is computed as

        L = 1/n [ sum_ij softplus(x_ij) - sum_{z_ij = 1} x_ij ],  x_ij = t x_i . y_j + b,

    so the positives never need the logit matrix. keys (loss.positives): z_ij = 1 for every pair
    of rows sharing a key (each row's own pair included), their x_ij subtracted block by block
    where the blocks are; None: z_ij = 1 for i = j only. exchange: "bidir" receives the other
    ranks' texts from the two ring neighbours a block per step (open_clip's default; autograd
    keeps every received block for the backward); "gather" all-gathers them; "ring" passes them
    round the ring and again in the backward, holding one other rank's block at a time. tile > 0:
    each block of pairs in tile x tile pieces."""
    if exchange not in ("bidir", "gather", "ring"):
        raise ValueError(f"loss.exchange: {exchange!r} is not bidir, gather or ring")
    rank, world = rank_and_world()
    image, text = image.float(), text.float()
    scale, bias = logit_scale.float().reshape(()), logit_bias.float().reshape(())
    n = image.shape[0]
    pos = _keyed(keys, n, local=True)[0] if keys is not None else None
    if exchange == "ring":
        total = ring_rows("softplus", image, text, scale, bias, tile, pos)
    elif exchange == "gather" and world > 1:
        all_text = all_gather_with_grad(text)
        total = softplus_sum(image, all_text, scale, bias, tile, pos)
    else:
        total = softplus_sum(image, text, scale, bias, tile, columns_of(pos, rank, n))
        for source, block in zip(other_ranks_order(), other_ranks_blocks(text)):
            total = total + softplus_sum(image, block, scale, bias, tile, columns_of(pos, source, n))
    return (total - (_positives(image, text, scale) + bias).sum()) / n


def clip_loss(out: dict, cfg, keys: torch.Tensor | None = None) -> torch.Tensor:
    """The dual encoder's loss that the recipe names (cfg: a ClipLossConfig); keys: the batch's
    positives key (loss.positives), None for index."""
    if cfg.name == "siglip":
        return siglip_loss(out["image"], out["text"], out["logit_scale"], out["logit_bias"], cfg.exchange, cfg.tile, keys)
    return contrastive_loss(out["image"], out["text"], out["logit_scale"], cfg.variant, cfg.tile, keys)

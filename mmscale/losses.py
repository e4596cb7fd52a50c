"""Symmetric InfoNCE (CMLA eq. 5-8) with an all-gather that carries gradients.

Features are expected L2-normalised and logit_scale is the multiplier exp(log(1/tau)),
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
import torch.distributed as dist
import torch.nn.functional as F


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns the sum over ranks of the gradient for our rows.

    all_reduce + slice instead of reduce_scatter because gloo (CPU) has no reduce_scatter.
    Every rank must contribute the same number of rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x)


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

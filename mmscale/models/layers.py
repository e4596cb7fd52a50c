"""Small building blocks shared by the models: MLPs, the learnable temperature, mixing and
masked pooling. Nothing here knows about ranks, recipes or data."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn


def mlp(width_in: int, hidden: list[int], width_out: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout) per hidden layer, then a last Linear without activation.
    CMLA's projection heads (eq. 3-4: z = W2 ReLU(W1 h)) are mlp(width, [hidden], out)."""
    layers, width = [], width_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, width_out))
    return nn.Sequential(*layers)


class LogitScale(nn.Module):
    """The contrastive logit multiplier 1/tau, stored as log(1/tau) (a parameter when learnt, a
    buffer when fixed). The stored value is 1-d, [1], not a scalar: DeepSpeed cannot broadcast
    0-dim parameters. CLIP's clamp keeps a learnt temperature from collapsing: 1/tau <= 100."""

    MAX = math.log(100.0)

    def __init__(self, temperature: float, learnable: bool):
        super().__init__()
        init = torch.full((1,), math.log(1.0 / temperature))
        if learnable:
            self.log_value = nn.Parameter(init)
        else:
            self.register_buffer("log_value", init)

    def forward(self) -> torch.Tensor:
        return self.log_value.clamp(max=self.MAX).exp()

    def parameter_bounds(self) -> dict:
        """{parameter: (low, high)}: the trainer clamps the optimizer's copy there after every
        step (as open_clip clamps logit_scale), so a learnt value never sits above the clamp with
        a zero gradient."""
        return {self.log_value: (None, self.MAX)} if isinstance(self.log_value, nn.Parameter) else {}


class LogitBias(nn.Module):
    """SigLIP's learnt logit bias b (a [1] parameter, like LogitScale's value)."""

    def __init__(self, init: float):
        super().__init__()
        self.value = nn.Parameter(torch.full((1,), float(init)))

    def forward(self) -> torch.Tensor:
        return self.value


def blend(x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lambda_i x_i + (1 - lambda_i) partner_i, lambda broadcast over the trailing dims."""
    lam = lam.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return lam * x + (1 - lam) * partner


def mix(x: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lambda_i x_i + (1 - lambda_i) x_perm(i), lambda broadcast over the trailing dims."""
    return blend(x, x[perm], lam)


MIX_DRAWS = ("paper", "shared", "per_modality")


def draw_mixing(names: list[str], n: int, alpha: float, draws: str = "paper",
                prob: float = 1.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{modality: (partner index perm_m, lambda)} for n rows, from torch's global (CPU) RNG.

    lambda_i ~ Beta(alpha, alpha); with prob < 1 a row is mixed with probability prob and the
    others keep lambda = 1. draws (loss.m3co_draws):
      paper         M3CoL eq. 2: one lambda_i for every modality, each modality its own partner
                    permutation (modality 1 of sample i mixed with j, modality 2 with k);
      shared        one lambda_i and one permutation for all modalities (the mixup baseline);
      per_modality  a permutation and a lambda per modality (the M3CoL authors' code).
    Every perm is a permutation of 0..n-1 (partners drawn without replacement)."""
    if draws not in MIX_DRAWS:
        raise ValueError(f"m3co draws: {draws!r} is not one of {MIX_DRAWS}")

    def lam_draw():
        lam = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample((n,))
        if prob < 1:  # rows left unmixed keep lambda = 1
            lam = torch.where(torch.rand(n) < prob, lam, torch.ones_like(lam))
        return lam

    if draws == "shared":
        perm = torch.randperm(n)
        lam = lam_draw()
        return {m: (perm, lam) for m in names}
    if draws == "paper":
        lam = lam_draw()
        return {m: (torch.randperm(n), lam) for m in names}
    out = {}
    for m in names:
        perm = torch.randperm(n)
        out[m] = (perm, lam_draw())
    return out


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of [B, T, D] where mask [B, T] is true."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode for the block, its previous mode restored afterwards (errors too)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

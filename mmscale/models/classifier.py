"""The supervised fusion classifier of UniS-MMC, M3CoL and the concatenation baselines.

Every modality is encoded to one vector: a tabular view by an MLP (M3CoL's 2-layer encoders),
an image or a text by a tower (optionally projected to model.embed_dim). Each modality gets its
own classifier head (the unimodal predictions UniS-MMC and M3CoL supervise) and the
concatenation of all embeddings feeds the fused classifier, which makes the prediction.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ClassifyModelConfig, ConfigError, ModalityConfig
from .layers import mix, mlp

layers_mix = mix  # forward's `mix` argument shadows the function there
from .towers import Tower, build_tower

MIX_MODES = ("none", "m3co", "mixup")


def xavier_init(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases for every Linear layer of `module` (the init of the
    M3CoL and UniS-MMC authors' code)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class TabularEncoder(nn.Module):
    def __init__(self, input_dim: int, hidden: list[int], width: int):
        super().__init__()
        self.net, self.width = mlp(input_dim, hidden, width), width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_mixed(self, x: torch.Tensor, perm, lam) -> torch.Tensor:
        return self.net(mix(x, perm, lam))


class TowerEncoder(nn.Module):
    """An image or text tower, projected to `width` when that differs."""

    def __init__(self, kind: str, cfg, width: int):
        super().__init__()
        self.kind = kind
        self.tower = build_tower(cfg)
        self.proj = nn.Linear(self.tower.width, width) if width and width != self.tower.width else nn.Identity()
        self.width = width or self.tower.width

    def forward(self, x) -> torch.Tensor:
        h = self.tower(x) if self.kind == "image" else self.tower(x["input_ids"], x["attention_mask"])
        return self.proj(h)

    def forward_mixed(self, x, perm, lam) -> torch.Tensor:
        if self.kind == "image":
            return self.forward(mix(x, perm, lam))
        # discrete tokens cannot be interpolated: mix their embeddings, attend to either's tokens
        embeds = mix(self.tower.embed_tokens(x["input_ids"]), perm, lam)
        mask = torch.maximum(x["attention_mask"], x["attention_mask"][perm])
        return self.proj(self.tower.forward_embeds(embeds, mask))


def build_encoder(mod: ModalityConfig, index: int, width: int) -> nn.Module:
    if mod.kind == "tabular":
        if mod.input_dim <= 0:
            raise ConfigError(f"model.modalities.{index}.input_dim: unknown (the data sets it)")
        return TabularEncoder(mod.input_dim, list(mod.hidden_dims), width)
    return TowerEncoder(mod.kind, mod.tower, width)


def modality_inputs(batch: dict, name: str):
    """A modality's input in a batch: a tensor under its name, or a text's name/input_ids and
    name/attention_mask."""
    if name in batch:
        return batch[name]
    return {"input_ids": batch[f"{name}/input_ids"], "attention_mask": batch[f"{name}/attention_mask"]}


class FusionClassifier(nn.Module):
    """Encoders -> unimodal heads and concatenation -> fused head.

    Outputs per sample: logits (fused), logits/<m> (unimodal), emb/<m> (embeddings). In training,
    `mix` adds mixup outputs: "m3co" gives mix_emb/<m>, mix_perm/<m>, mix_lambda/<m> for M3Co;
    "mixup" (the mixup baseline) mixes every modality's input with one permutation and gives
    mix_logits, mix_perm, mix_lambda. The draws come from torch's global RNG, which the engine
    seeds per step; lambda ~ Beta(alpha, alpha).

    M3Co's options (forward's arguments; loss.m3co_* in a recipe): `draws` shared (eq. 2: one
    lambda_i and one partner k(i) for all modalities) or per_modality (the authors' code); `at`
    inputs (eq. 2) or embeddings (the authors' code mixes the encoders' outputs); `prob`, the
    share of rows mixed, the others keeping lambda = 1 (the authors' code: 0.5).
    """

    def __init__(self, cfg: ClassifyModelConfig, unimodal_heads: bool = True, mixup_alpha: float = 0.15):
        super().__init__()
        self.cfg, self.names = cfg, [m.name for m in cfg.modalities]
        self.encoders = nn.ModuleDict({m.name: build_encoder(m, i, cfg.embed_dim) for i, m in enumerate(cfg.modalities)})
        c = cfg.classifier
        self.heads = nn.ModuleDict({n: mlp(e.width, list(c.hidden_dims), cfg.num_classes, c.dropout)
                                    for n, e in self.encoders.items()}) if unimodal_heads else None
        self.fused_head = mlp(sum(e.width for e in self.encoders.values()), list(c.hidden_dims), cfg.num_classes,
                              c.dropout)
        self.alpha = mixup_alpha
        if getattr(cfg, "init", "default") == "xavier":  # the towers keep their (pretrained) weights
            for n, e in self.encoders.items():
                xavier_init(e.net if isinstance(e, TabularEncoder) else e.proj)
            for head in [*(self.heads.values() if self.heads is not None else []), self.fused_head]:
                xavier_init(head)

    def named_towers(self) -> dict[str, Tower]:
        return {n: e.tower for n, e in self.encoders.items() if isinstance(e, TowerEncoder)}

    def tower(self, name: str) -> Tower:
        return self.encoders[name].tower

    def _draw(self, n: int, device, prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        perm = torch.randperm(n).to(device)
        lam = torch.distributions.Beta(torch.tensor(self.alpha), torch.tensor(self.alpha)).sample((n,))
        if prob < 1:  # rows left unmixed keep lambda = 1
            lam = torch.where(torch.rand(n) < prob, lam, torch.ones_like(lam))
        return perm, lam.to(device)

    def forward(self, batch: dict, mix: str = "none", draws: str = "shared", at: str = "inputs",
                prob: float = 1.0) -> dict:
        if mix not in MIX_MODES:
            raise ValueError(f"mix: {mix!r} is not one of {MIX_MODES}")
        inputs = {n: modality_inputs(batch, n) for n in self.names}
        emb = {n: self.encoders[n](inputs[n]) for n in self.names}
        out = {"logits": self.fused_head(torch.cat([emb[n] for n in self.names], -1))}
        for n in self.names:
            out[f"emb/{n}"] = emb[n]
            if self.heads is not None:
                out[f"logits/{n}"] = self.heads[n](emb[n])
        if not self.training or mix == "none":
            return out
        rows = len(batch["label"])
        device = out["logits"].device
        if mix == "m3co":
            if draws not in ("shared", "per_modality") or at not in ("inputs", "embeddings"):
                raise ValueError(f"m3co mixing: draws {draws!r} (shared, per_modality), at {at!r} (inputs, embeddings)")
            shared = self._draw(rows, device, prob) if draws == "shared" else None
            for n in self.names:
                perm, lam = shared or self._draw(rows, device, prob)
                mixed = layers_mix(emb[n], perm, lam) if at == "embeddings" else \
                    self.encoders[n].forward_mixed(inputs[n], perm, lam)
                out.update({f"mix_emb/{n}": mixed, f"mix_perm/{n}": perm, f"mix_lambda/{n}": lam})
        else:
            perm, lam = self._draw(rows, device)
            mixed = [self.encoders[n].forward_mixed(inputs[n], perm, lam) for n in self.names]
            out.update(mix_logits=self.fused_head(torch.cat(mixed, -1)), mix_perm=perm, mix_lambda=lam)
        return out

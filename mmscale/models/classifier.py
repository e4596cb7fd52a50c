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
from .layers import blend, draw_mixing, mlp
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

    def forward_mixed(self, x: torch.Tensor, partner: torch.Tensor, lam) -> torch.Tensor:
        """The encoding of lambda_i x_i + (1 - lambda_i) partner_i."""
        return self.net(blend(x, partner, lam))


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

    def forward_mixed(self, x, partner, lam) -> torch.Tensor:
        """The encoding of x mixed with partner (same structure, one partner row per row)."""
        if self.kind == "image":
            return self.forward(blend(x, partner, lam))
        # discrete tokens cannot be interpolated: mix their embeddings, attend to either's tokens
        embeds = blend(self.tower.embed_tokens(x["input_ids"]), self.tower.embed_tokens(partner["input_ids"]), lam)
        mask = torch.maximum(x["attention_mask"], partner["attention_mask"])
        return self.proj(self.tower.forward_embeds(embeds, mask))


def build_encoder(mod: ModalityConfig, index: int, width: int) -> nn.Module:
    if mod.kind == "tabular":
        if mod.input_dim <= 0:
            raise ConfigError(f"model.modalities.{index}.input_dim: unknown (the data sets it)")
        return TabularEncoder(mod.input_dim, list(mod.hidden_dims), width)
    return TowerEncoder(mod.kind, mod.tower, width)


def select_rows(x, index: torch.Tensor):
    """Rows `index` of a modality's input (a tensor, or a text's dict of tensors)."""
    return {k: v[index] for k, v in x.items()} if isinstance(x, dict) else x[index]


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
    mix_logits, mix_perm, mix_lambda.

    Where the partners come from: by default the model draws them over this call's rows from
    torch's global RNG (which the engine seeds per step and rank); `partners` = {modality:
    (partner_input, perm, lambda)} hands it partner rows drawn elsewhere (the task draws them over
    the global batch, see ClassifyTask.forward), perm then being only reported. lambda ~
    Beta(alpha, alpha).

    M3Co's options (forward's arguments; loss.m3co_* in a recipe): `draws` paper (eq. 2: one
    lambda_i, a partner permutation per modality: j for modality 1, k for modality 2), shared
    (one lambda_i and one partner for every modality) or per_modality (the authors' code: both
    drawn per modality), see layers.draw_mixing; `at` inputs (eq. 2) or embeddings (the authors'
    code mixes the encoders' outputs); `prob`, the share of rows mixed, the others keeping
    lambda = 1 (the authors' code: 0.5).
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

    def forward(self, batch: dict, mix: str = "none", draws: str = "paper", at: str = "inputs",
                prob: float = 1.0, partners: dict | None = None) -> dict:
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
        device = out["logits"].device
        if at not in ("inputs", "embeddings"):
            raise ValueError(f"m3co mixing: at {at!r} is not inputs or embeddings")
        if partners is None:  # drawn here, over this call's rows
            rows = len(batch["label"])
            drawn = draw_mixing(self.names, rows, self.alpha, draws if mix == "m3co" else "shared",
                                prob if mix == "m3co" else 1.0)
            partners = {}
            for n, (perm, lam) in drawn.items():
                perm, lam = perm.to(device), lam.to(device)
                partners[n] = (emb[n][perm] if mix == "m3co" and at == "embeddings" else select_rows(inputs[n], perm),
                               perm, lam)
        elif at == "embeddings":
            raise ValueError("m3co mixing at the embeddings with partners drawn elsewhere: mix the gathered embeddings")
        if mix == "m3co":
            for n in self.names:
                partner, perm, lam = partners[n]
                mixed = blend(emb[n], partner, lam) if at == "embeddings" else \
                    self.encoders[n].forward_mixed(inputs[n], partner, lam)
                out.update({f"mix_emb/{n}": mixed, f"mix_perm/{n}": perm, f"mix_lambda/{n}": lam})
        else:
            _, perm, lam = partners[self.names[0]]
            mixed = [self.encoders[n].forward_mixed(inputs[n], partners[n][0], lam) for n in self.names]
            out.update(mix_logits=self.fused_head(torch.cat(mixed, -1)), mix_perm=perm, mix_lambda=lam)
        return out

"""Fine-tuning models: per-modality encoders and the supervised fusion classifier (UniS-MMC,
M3CoL and the concatenation baselines).

Every modality is encoded to one vector: a tabular view by an MLP (M3CoL's 2-layer encoders),
an image or a text by a tower from models.py (optionally projected to model.embed_dim). Each
modality gets its own classifier head (the unimodal predictions UniS-MMC and M3CoL supervise)
and the concatenation of all embeddings feeds the fused classifier, which makes the prediction.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, ModalityConfig, ModelConfig, tower_config
from .models import build_image_tower, build_text_tower, projection_head


def mlp(width_in: int, hidden: list[int], width_out: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout) per hidden layer, then a last Linear without activation."""
    layers, width = [], width_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, width_out))
    return nn.Sequential(*layers)


def mix(x: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lambda_i x_i + (1 - lambda_i) x_perm(i), lambda broadcast over the trailing dims."""
    lam = lam.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return lam * x + (1 - lam) * x[perm]


class TabularEncoder(nn.Module):
    def __init__(self, input_dim: int, hidden: list[int], width: int):
        super().__init__()
        self.net, self.width = mlp(input_dim, hidden, width), width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_mixed(self, x: torch.Tensor, perm, lam) -> torch.Tensor:
        return self.net(mix(x, perm, lam))


class TowerEncoder(nn.Module):
    """An image or text tower from models.py, projected to `width` when that differs."""

    def __init__(self, kind: str, cfg, width: int):
        super().__init__()
        self.kind = kind
        self.tower = build_image_tower(cfg) if kind == "image" else build_text_tower(cfg)
        self.tower.requires_grad_(not cfg.freeze)
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
    return TowerEncoder(mod.kind, tower_config(mod, index), width)


def modality_inputs(batch: dict, name: str):
    """A modality's input in a batch: a tensor under its name, or a text's name/input_ids and
    name/attention_mask."""
    if name in batch:
        return batch[name]
    return {"input_ids": batch[f"{name}/input_ids"], "attention_mask": batch[f"{name}/attention_mask"]}


class FusionClassifier(nn.Module):
    """Encoders -> unimodal heads and concatenation -> fused head.

    Outputs per sample: logits (fused), logits/<m> (unimodal), emb/<m> (embeddings). In training,
    `mix` adds mixup outputs: "per_modality" (M3Co) gives mix_emb/<m>, mix_perm/<m>,
    mix_lambda/<m> with a permutation and lambdas of its own per modality; "shared" (the mixup
    baseline) mixes every modality with one permutation and gives mix_logits, mix_perm, mix_lambda.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, unimodal_heads: bool = True, mixup_alpha: float = 0.15):
        super().__init__()
        self.cfg, self.names = cfg, [m.name for m in cfg.modalities]
        self.encoders = nn.ModuleDict({m.name: build_encoder(m, i, cfg.embed_dim) for i, m in enumerate(cfg.modalities)})
        c = cfg.classifier
        self.heads = nn.ModuleDict({n: mlp(e.width, list(c.hidden_dims), num_classes, c.dropout)
                                    for n, e in self.encoders.items()}) if unimodal_heads else None
        self.fused_head = mlp(sum(e.width for e in self.encoders.values()), list(c.hidden_dims), num_classes, c.dropout)
        self.alpha = mixup_alpha
        self.mix = "none"
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        for enc in self.encoders.values():  # a frozen tower keeps its pretrained statistics
            if hasattr(enc, "tower") and not any(p.requires_grad for p in enc.tower.parameters()):
                enc.tower.eval()
        return self

    def tower(self, name: str) -> nn.Module:
        return self.encoders[name].tower

    def _draw(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        perm = torch.randperm(n).to(device)
        lam = torch.distributions.Beta(torch.tensor(self.alpha), torch.tensor(self.alpha)).sample((n,)).to(device)
        return perm, lam

    def forward(self, batch: dict) -> dict:
        inputs = {n: modality_inputs(batch, n) for n in self.names}
        emb = {n: self.encoders[n](inputs[n]) for n in self.names}
        out = {"logits": self.fused_head(torch.cat([emb[n] for n in self.names], -1))}
        for n in self.names:
            out[f"emb/{n}"] = emb[n]
            if self.heads is not None:
                out[f"logits/{n}"] = self.heads[n](emb[n])
        if not self.training or self.mix == "none":
            return out
        rows = len(batch["label"])
        device = out["logits"].device
        if self.mix == "per_modality":
            for n in self.names:
                perm, lam = self._draw(rows, device)
                out.update({f"mix_emb/{n}": self.encoders[n].forward_mixed(inputs[n], perm, lam),
                            f"mix_perm/{n}": perm, f"mix_lambda/{n}": lam})
        elif self.mix == "shared":
            perm, lam = self._draw(rows, device)
            mixed = [self.encoders[n].forward_mixed(inputs[n], perm, lam) for n in self.names]
            out.update(mix_logits=self.fused_head(torch.cat(mixed, -1)), mix_perm=perm, mix_lambda=lam)
        else:
            raise ValueError(f"mix: {self.mix!r}")
        return out


# ---------------------------------------------------------------- CBMF (Context-Based Multimodal Fusion)

DFE_FUSIONS = ("add", "multiply", "concat", "attention_additive", "attention_dot")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of [B, T, D] where mask [B, T] is true."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


def align_buffers(module: nn.Module) -> None:
    """Floating buffers (batch-norm statistics) in the dtype of the parameters: DeepSpeed's bf16
    casts a model's parameters but not its buffers, and a frozen CNN then mixes the two."""
    dtype = next(module.parameters()).dtype
    for mod in module.modules():
        for key, buf in mod._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                mod._buffers[key] = buf.to(dtype)


class DeepFusionEncoder(nn.Module):
    """CBMF's Deep Fusion Encoder, shared by the modalities; the context vector says which one.

    e [B, T, width] (T = 1 for pooled features) with a validity mask [B, T], and the modality's
    context c [width] are fused token by token (add: e + c, multiply: e * c, concat:
    Linear([e; c])) or pooled into one token by attention with the context as the query
    (attention_additive: score_t = v^T tanh(W_q c + W_k e_t); attention_dot: score_t =
    (W_q c).(W_k e_t) / sqrt(width); alpha = masked softmax; x = sum_t alpha_t W_v e_t). Then
    x + Block(LayerNorm(x)) with one transformer encoder block, and the masked mean over tokens.
    """

    def __init__(self, width: int, fusion: str = "add", num_heads: int = 4):
        super().__init__()
        if fusion not in DFE_FUSIONS:
            raise ConfigError(f"model.dfe.fusion: {fusion!r} is not one of {list(DFE_FUSIONS)}")
        if width % num_heads:
            raise ConfigError(f"model.dfe.num_heads: {num_heads} does not divide model.dfe.width {width}")
        self.width, self.fusion = width, fusion
        if fusion == "concat":
            self.merge = nn.Linear(2 * width, width)
        if fusion.startswith("attention"):
            self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
            if fusion == "attention_additive":
                self.score = nn.Linear(width, 1, bias=False)
        self.norm = nn.LayerNorm(width)
        self.block = nn.TransformerEncoderLayer(width, num_heads, 4 * width, dropout=0.0, activation="gelu",
                                                batch_first=True)

    def attention(self, e: torch.Tensor, mask: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """[B, T] weights of the tokens for the context query; masked tokens get exactly 0."""
        q, k = self.query(c), self.key(e)
        if self.fusion == "attention_additive":
            scores = self.score(torch.tanh(q + k)).squeeze(-1)
        else:
            scores = (k @ q) / math.sqrt(self.width)
        return scores.float().masked_fill(~mask, float("-inf")).softmax(-1).to(e.dtype)

    def fuse(self, e: torch.Tensor, mask: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fusion == "add":
            return e + c, mask
        if self.fusion == "multiply":
            return e * c, mask
        if self.fusion == "concat":
            return self.merge(torch.cat([e, c.expand_as(e)], -1)), mask
        pooled = (self.attention(e, mask, c).unsqueeze(-1) * self.value(e)).sum(1, keepdim=True)
        return pooled, mask.new_ones(pooled.shape[:2])

    def forward(self, e: torch.Tensor, mask: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mask = mask.bool()
        x, mask = self.fuse(e, mask, c.to(e.dtype))
        x = x + self.block(self.norm(x), src_key_padding_mask=~mask)
        return masked_mean(x, mask)


class CBMF(nn.Module):
    """Context-Based Multimodal Fusion: two frozen towers f_m, trained projections g_m, learned
    context embeddings and one shared Deep Fusion Encoder, aligned by CBMF's soft-target
    contrastive loss with a learnable temperature.

    Training reads the towers' cached outputs (batch["feat/<m>"]: [B, w] pooled, or [B, T, w]
    tokens with batch["mask/<m>"]), so DFE epochs never run the towers; encode_image /
    encode_text run the towers live, so evaluate.py works on this model unchanged.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        mods, d = cfg.modalities, cfg.dfe
        if len(mods) != 2:
            raise ConfigError(f"model.modalities: cbmf aligns exactly two frozen towers, got {len(mods)}")
        self.names = [m.name for m in mods]
        self.kinds = {m.name: m.kind for m in mods}
        self.features = d.features
        towers = {}
        for i, m in enumerate(mods):
            if m.kind not in ("image", "text"):
                raise ConfigError(f"model.modalities.{i}.kind: cbmf needs image or text towers, not {m.kind}")
            tower = (build_image_tower if m.kind == "image" else build_text_tower)(tower_config(m, i))
            if d.features == "tokens" and not hasattr(tower, "forward_tokens"):
                raise ConfigError(f"model.dfe.features: tokens needs a tower with token outputs (timm, hf, "
                                  f"efficientnet_lite); model.modalities.{i} has none")
            towers[m.name] = tower.requires_grad_(False)
        self.towers = nn.ModuleDict(towers)
        self.proj = nn.ModuleDict({n: projection_head(t.width, d.projection_hidden, d.width)
                                   for n, t in towers.items()})
        self.context = nn.Embedding(2, d.width)
        # small, like BERT's embeddings: a N(0, 1) context would swamp the projected features
        # under add fusion and start every sample at the same embedding
        nn.init.normal_(self.context.weight, std=0.02)
        self.dfe = DeepFusionEncoder(d.width, d.fusion, d.num_heads)
        # log(1/tau), always learnable; 1-d because DeepSpeed bf16 crashes broadcasting 0-d parameters
        self.log_logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.temperature)))
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        for tower in self.towers.values():  # frozen: pretrained statistics, no dropout
            tower.eval()
        return self

    def tower(self, name: str) -> nn.Module:
        return self.towers[name]

    def named_kind(self, kind: str) -> str:
        names = [n for n in self.names if self.kinds[n] == kind]
        if len(names) != 1:
            raise ValueError(f"this CBMF model has {len(names)} {kind} modalities (needs exactly one)")
        return names[0]

    def tower_features(self, name: str, inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen tower's output: ([B, w] pooled, None) or ([B, T, w] tokens, [B, T] mask).
        inputs: images, or {"input_ids", "attention_mask"}."""
        tower = self.towers[name]
        align_buffers(tower)
        if self.kinds[name] == "image":
            if self.features == "pooled":
                return tower(inputs), None
            tokens, _ = tower.forward_tokens(inputs)
            return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if self.features == "pooled":
            return tower(ids, mask), None
        return tower.forward_tokens(ids, mask), mask.bool()

    def fuse(self, name: str, feat: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tower output -> g_m -> DFE with the modality's context -> L2-normalised embedding."""
        if feat.ndim == 2:
            feat = feat.unsqueeze(1)
        if mask is None:
            mask = torch.ones(feat.shape[:2], dtype=torch.bool, device=feat.device)
        context = self.context.weight[self.names.index(name)]
        return F.normalize(self.dfe(self.proj[name](feat), mask, context), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP's clamp: 1/tau <= 100

    def forward(self, batch: dict) -> dict:
        out = {n: self.fuse(n, batch[f"feat/{n}"], batch.get(f"mask/{n}")) for n in self.names}
        out["logit_scale"] = self.logit_scale()
        return out

    def encode(self, name: str, inputs) -> torch.Tensor:
        with torch.no_grad():  # the towers are frozen
            feat, mask = self.tower_features(name, inputs)
        return self.fuse(name, feat, mask)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(self.named_kind("image"), images)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encode(self.named_kind("text"), {"input_ids": input_ids, "attention_mask": attention_mask})

    def tokenize(self, texts: list[str]) -> dict:
        return self.towers[self.named_kind("text")].tokenize_fn()(texts)

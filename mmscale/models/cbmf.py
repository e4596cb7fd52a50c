"""CBMF (Context-Based Multimodal Fusion): frozen towers, projections g_m, learned context
embeddings and one shared Deep Fusion Encoder."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import CBMFModelConfig, ConfigError
from .layers import LogitScale, masked_mean, mlp
from .towers import Tower, build_tower

DFE_FUSIONS = ("add", "multiply", "concat", "attention_additive", "attention_dot")


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
    encode_text run the towers live, so evaluation works on this model unchanged.
    """

    def __init__(self, cfg: CBMFModelConfig):
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
            tower = build_tower(m.tower, frozen=True)
            if d.features == "tokens" and not hasattr(tower, "forward_tokens"):
                raise ConfigError(f"model.dfe.features: tokens needs a tower with token outputs (timm, hf, "
                                  f"efficientnet_lite); model.modalities.{i} has none")
            towers[m.name] = tower
        self.towers = nn.ModuleDict(towers)
        self.proj = nn.ModuleDict({n: mlp(t.width, [d.projection_hidden], d.width) for n, t in towers.items()})
        self.context = nn.Embedding(2, d.width)
        # small, like BERT's embeddings: a N(0, 1) context would swamp the projected features
        # under add fusion and start every sample at the same embedding
        nn.init.normal_(self.context.weight, std=0.02)
        self.dfe = DeepFusionEncoder(d.width, d.fusion, d.num_heads)
        self.logit_scale = LogitScale(cfg.temperature, learnable=True)

    def named_towers(self) -> dict[str, Tower]:
        return dict(self.towers)

    def tower(self, name: str) -> Tower:
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

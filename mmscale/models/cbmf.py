"""CBMF (Context-Based Multimodal Fusion): frozen towers, projections g_m, learned context
embeddings and one shared Deep Fusion Encoder."""
from __future__ import annotations

import hashlib
import math
import typing

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import CBMFModelConfig, DFEConfig
from .layers import LogitScale, masked_mean, mlp
from .towers import Tower, build_tower

DFE_FUSIONS = typing.get_args(typing.get_type_hints(DFEConfig)["fusion"])
MEMO_BYTES = 1 << 30  # cap of the frozen towers' memo (evaluation inputs seen again)


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
    Linear([e; c])) or through attention with the context as the query (attention_additive:
    score_t = v^T tanh(W_q c + W_k e_t); attention_dot: score_t = (W_q c).(W_k e_t) / sqrt(width);
    alpha = masked softmax; a = sum_t alpha_t W_v e_t). With attention_output "sequence" (the
    authors' code, b-faye/lightweightCRL, */fusion.py) a is added to every token, x_t = e_t + a,
    and the sequence goes on; with "pooled" the one token a goes on alone. Then
    x + Block(LayerNorm(x)) with one transformer encoder block (feed-forward ff_dim, dropout), and
    the masked mean over tokens. fusion "none" is no DFE at all: the masked mean of e (heads only).
    The arguments are model.dfe's, checked when the recipe is loaded (config/validate.py).
    """

    def __init__(self, width: int, fusion: str = "add", num_heads: int = 4, attention_output: str = "sequence",
                 ff_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        self.width, self.fusion, self.attention_output = width, fusion, attention_output
        if fusion == "none":
            return
        if fusion == "concat":
            self.merge = nn.Linear(2 * width, width)
        if fusion.startswith("attention"):
            self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
            if fusion == "attention_additive":
                self.score = nn.Linear(width, 1, bias=False)
        self.norm = nn.LayerNorm(width)
        self.block = nn.TransformerEncoderLayer(width, num_heads, ff_dim or 4 * width, dropout=dropout,
                                                activation="gelu", batch_first=True)

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
        if self.attention_output == "sequence":
            return e + pooled, mask
        return pooled, mask.new_ones(pooled.shape[:2])

    def forward(self, e: torch.Tensor, mask: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mask = mask.bool()
        if self.fusion == "none":
            return masked_mean(e, mask)
        x, mask = self.fuse(e, mask, c.to(e.dtype))
        x = x + self.block(self.norm(x), src_key_padding_mask=~mask)
        return masked_mean(x, mask)


def projection(width_in: int, cfg) -> nn.Module:
    """g_m: "relu" Linear -> ReLU -> Linear; "gelu_ln" Linear -> GELU -> Linear -> Dropout ->
    LayerNorm (the authors' ProjectionHead, b-faye/lightweightCRL, baseline.py)."""
    if cfg.projection == "relu":
        return mlp(width_in, [cfg.projection_hidden], cfg.width)
    return nn.Sequential(nn.Linear(width_in, cfg.projection_hidden), nn.GELU(),
                         nn.Linear(cfg.projection_hidden, cfg.width), nn.Dropout(cfg.dropout),
                         nn.LayerNorm(cfg.width))


class ContextMLP(nn.Module):
    """Per modality a learned context_input_dim-d vector, through Linear/ReLU layers (64, 128) to
    the DFE width and a LayerNorm, so the context is on the scale of LayerNorm'd features (the
    authors' ContextEncoder: its vectors start N(0, s^2) with s ~ U(0.1, 0.6) per modality)."""

    def __init__(self, count: int, input_dim: int, width: int):
        super().__init__()
        std = torch.rand(count, 1) * 0.5 + 0.1
        self.raw = nn.Parameter(torch.randn(count, input_dim) * std)
        self.net = nn.Sequential(mlp(input_dim, [64, 128], width), nn.LayerNorm(width))

    def forward(self, index: int) -> torch.Tensor:
        return self.net(self.raw[index])


class CBMF(nn.Module):
    """Context-Based Multimodal Fusion: two frozen towers f_m, trained projections g_m, learned
    context embeddings and one shared Deep Fusion Encoder, aligned by CBMF's soft-target
    contrastive loss with a learnable temperature.

    Training reads the towers' cached outputs (batch["feat/<m>"]: [B, w] pooled, or [B, T, w]
    tokens with batch["mask/<m>"]), so DFE epochs never run the towers; encode_image /
    encode_text run the towers live, so evaluation works on this model unchanged. The frozen
    towers' outputs for inputs seen before (the same evaluation images and prompts at every
    evaluation) come from a memo keyed by the inputs' bytes, so an evaluation runs each tower
    once per run; the memo is emptied whenever weights are loaded. The config is trusted: two
    image/text modalities, towers with token outputs for features "tokens" (config/validate.py).
    """

    def __init__(self, cfg: CBMFModelConfig):
        super().__init__()
        self.cfg = cfg
        mods, d = cfg.modalities, cfg.dfe
        self.names = [m.name for m in mods]
        self.kinds = {m.name: m.kind for m in mods}
        self.features = d.features
        towers = {m.name: build_tower(m.tower, frozen=True) for m in mods}
        self.towers = nn.ModuleDict(towers)
        self.proj = nn.ModuleDict({n: projection(t.width, d) for n, t in towers.items()})
        if d.context == "mlp":
            self.context = ContextMLP(2, d.context_input_dim, d.width)
        else:  # embedding
            self.context = nn.Embedding(2, d.width)
            # small, like BERT's embeddings: a N(0, 1) context would swamp the projected features
            # under add fusion and start every sample at the same embedding
            nn.init.normal_(self.context.weight, std=0.02)
        self.dfe = DeepFusionEncoder(d.width, d.fusion, d.num_heads, d.attention_output, d.ff_dim, d.dropout)
        self.logit_scale = LogitScale(cfg.temperature, learnable=True)
        self._memo, self._memo_bytes = {}, 0

    def load_state_dict(self, *args, **kwargs):
        self._memo, self._memo_bytes = {}, 0
        return super().load_state_dict(*args, **kwargs)

    def context_vector(self, name: str) -> torch.Tensor:
        index = self.names.index(name)
        return self.context(index) if isinstance(self.context, ContextMLP) else self.context.weight[index]

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
        return F.normalize(self.dfe(self.proj[name](feat), mask, self.context_vector(name)), dim=-1)

    def forward(self, batch: dict) -> dict:
        out = {n: self.fuse(n, batch[f"feat/{n}"], batch.get(f"mask/{n}")) for n in self.names}
        out["logit_scale"] = self.logit_scale()
        return out

    def memo_features(self, name: str, inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tower_features, remembered by the inputs' bytes (the towers are frozen and in eval mode,
        so their output is a function of the input)."""
        h = hashlib.blake2b(name.encode(), digest_size=16)
        for t in ([inputs] if torch.is_tensor(inputs) else [inputs["input_ids"], inputs["attention_mask"]]):
            t = t.detach().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.cpu().view(-1).view(torch.uint8).numpy().tobytes())
        key = h.hexdigest()
        if key not in self._memo:
            feat, mask = self.tower_features(name, inputs)
            size = feat.numel() * feat.element_size()
            if self._memo_bytes + size > MEMO_BYTES:
                return feat, mask
            self._memo[key], self._memo_bytes = (feat, mask), self._memo_bytes + size
        return self._memo[key]

    def encode(self, name: str, inputs) -> torch.Tensor:
        with torch.no_grad():  # the towers are frozen
            feat, mask = self.memo_features(name, inputs)
        return self.fuse(name, feat, mask)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(self.named_kind("image"), images)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encode(self.named_kind("text"), {"input_ids": input_ids, "attention_mask": attention_mask})

    def tokenize(self, texts: list[str]) -> dict:
        return self.towers[self.named_kind("text")].tokenize_fn()(texts)

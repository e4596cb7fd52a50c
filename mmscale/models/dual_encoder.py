"""CMLA's dual encoder: an image tower and a text tower, optional shared-block fusion, MLP
projection heads (eq. 3-4) and the logit scale 1/tau (eq. 5-8 use it)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ClipModelConfig, ConfigError
from .layers import LogitBias, LogitScale, mlp
from .towers import Tower, build_tower


class SharedBlockFusion(nn.Module):
    """The concatenation-fusion baseline: one transformer block shared by both modalities.

    Each modality's token sequence is mapped to a common width and passed through the same
    block (shared weights); the pooled outputs are h_img and h_txt. The block never mixes
    an image with its own caption: that would leak the positive pair into each embedding
    and make the contrastive task (and retrieval over unpaired candidates) ill-posed.
    """

    def __init__(self, image_width: int, text_width: int, width: int, heads: int):
        super().__init__()
        self.image_in = nn.Identity() if image_width == width else nn.Linear(image_width, width)
        self.text_in = nn.Identity() if text_width == width else nn.Linear(text_width, width)
        self.block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                                batch_first=True, norm_first=True)

    def image(self, tokens, has_cls: bool):
        x = self.block(self.image_in(tokens))
        return x[:, 0] if has_cls else x.mean(1)

    def text(self, tokens, attention_mask):
        x = self.block(self.text_in(tokens), src_key_padding_mask=attention_mask == 0)
        return x[:, 0]


def open_clip_heads(image_width: int, text_width: int, out: int) -> tuple[nn.Sequential, nn.Sequential]:
    """The MLP projections open_clip puts on a timm image tower (timm_proj mlp: timm's Mlp, hidden
    2 x out, no bias on its last Linear by default) and an HF text tower (hf_proj_type mlp: hidden
    (width + out) // 2, no biases), both with GELU: heads of this shape export to open_clip."""
    image = nn.Sequential(nn.Linear(image_width, 2 * out), nn.GELU(), nn.Linear(2 * out, out, bias=False))
    hidden = (text_width + out) // 2
    text = nn.Sequential(nn.Linear(text_width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, out, bias=False))
    return image, text


class DualEncoder(nn.Module):
    """model(batch) -> {"image": [B, d], "text": [B, d] (L2-normalised), "logit_scale": [1]}, and
    "logit_bias": [1] when model.logit_bias is set (SigLIP)."""

    def __init__(self, cfg: ClipModelConfig):
        super().__init__()
        self.cfg = cfg
        ic, tc = cfg.image, cfg.text
        self.image_tower = build_tower(ic)
        self.text_tower = build_tower(tc)

        iw, tw = self.image_tower.width, self.text_tower.width
        self.fusion = None
        if cfg.fusion.type == "shared_block":  # timm and hf towers (config/validate.py)
            width = cfg.fusion.width or iw
            self.fusion = SharedBlockFusion(iw, tw, width, cfg.fusion.num_heads)
            iw = tw = width

        h = cfg.heads
        if h.enabled and h.style == "open_clip":
            self.image_head, self.text_head = open_clip_heads(iw, tw, h.output_dim)
        elif h.enabled:
            self.image_head = mlp(iw, [h.hidden_dim], h.output_dim)
            self.text_head = mlp(tw, [h.hidden_dim], h.output_dim)
        else:
            if iw != tw:
                raise ConfigError(f"model.heads.enabled: without heads the tower widths must match (image {iw}, text {tw})")
            self.image_head = self.text_head = nn.Identity()
        self.logit_scale = LogitScale(cfg.temperature, cfg.learn_temperature)
        self.logit_bias = LogitBias(cfg.logit_bias) if cfg.logit_bias is not None else None

    def named_towers(self) -> dict[str, Tower]:
        return {"image": self.image_tower, "text": self.text_tower}

    def tokenize(self, texts: list[str]) -> dict:
        return self.text_tower.tokenize_fn()(texts)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.fusion is not None:
            h = self.fusion.image(*self.image_tower.forward_tokens(images))
        else:
            h = self.image_tower(images)
        return F.normalize(self.image_head(h), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.fusion is not None:
            h = self.fusion.text(self.text_tower.forward_tokens(input_ids, attention_mask), attention_mask)
        else:
            h = self.text_tower(input_ids, attention_mask)
        return F.normalize(self.text_head(h), dim=-1)

    def forward(self, batch: dict) -> dict:
        out = {
            "image": self.encode_image(batch["image"]),
            "text": self.encode_text(batch["input_ids"], batch["attention_mask"]),
            "logit_scale": self.logit_scale(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias()
        return out

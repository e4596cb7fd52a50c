"""Evaluation of a dual encoder: zero-shot classification (CLIP / CMLA section V), image-text
retrieval (recall@k both ways, the CBMF Fig. 4 curve) and a linear probe on frozen image
embeddings (CLIP / CBMF Table V); and predictions of a classifier over a labelled dataset.

Everything here runs inside training on every rank: image and caption embeddings are computed
on a 1/world shard per rank (padded so every rank runs the same number of forwards, which
ZeRO-3 needs) and all-gathered; class prompts are encoded by every rank. Metrics come out
identical on all ranks. Out of training (tools/eval.py) the same code runs with world = 1.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ..data.images import CaptionDataset, Sample, image_transform, normalize_images
from ..data.batches import collate_images_labels, to_device
from ..dist import gather_rows, on_rank0, shard_rows
from ..models.layers import eval_mode
from .datasets import has_split, load_captions, load_classification, resolve_templates
from .metrics import logistic_probe, recall_curve, retrieval_ranks, topk_accuracy

# ---------------------------------------------------------------- embeddings (rank-aware)

@torch.no_grad()
def embed_images(model, samples: list[Sample], image_size: int, device, dtype, batch_size: int = 256) -> torch.Tensor:
    """[N, D] float32 image embeddings on `device`, identical on every rank."""
    idx = shard_rows(len(samples))
    ds = Subset(CaptionDataset(samples, image_transform(image_size, train=False)), idx)
    out = [model.encode_image(normalize_images(images.to(device), dtype)).float()
           for images, _ in DataLoader(ds, batch_size=batch_size, collate_fn=collate_images_labels)]
    return gather_rows(torch.cat(out), len(samples))


@torch.no_grad()
def embed_texts(model, texts: list[str], device, batch_size: int = 256) -> torch.Tensor:
    idx = shard_rows(len(texts))
    out = []
    for start in range(0, len(idx), batch_size):
        tok = model.tokenize([texts[i] for i in idx[start:start + batch_size]])
        out.append(model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float())
    return gather_rows(torch.cat(out), len(texts))


# ---------------------------------------------------------------- classification

@torch.no_grad()
def predict(model, dataset, collate, device, dtype, batch_size: int = 256, keep=("logits",)) -> dict:
    """The model's outputs whose names start with one of `keep` (per-sample outputs only) and the
    labels over a labelled dataset, as float32 / int64 CPU tensors identical on every rank (rows
    sharded over the ranks, then all-gathered)."""
    idx = shard_rows(len(dataset))
    parts: dict[str, list] = {}
    for batch in DataLoader(Subset(dataset, idx), batch_size=batch_size, collate_fn=collate):
        batch.pop("skipped", None)
        out = model(to_device(batch, device, dtype))
        out = {k: v.float() for k, v in out.items() if k.startswith(tuple(keep))}
        out["label"] = batch["label"].to(device)
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return {k: gather_rows(torch.cat(v), len(dataset)).cpu() for k, v in parts.items()}


# ---------------------------------------------------------------- zero-shot

@torch.no_grad()
def zeroshot_classifier(model, classnames: list[str], templates: list[str], device, dtype=None) -> torch.Tensor:
    """[C, D] class embeddings: the normalised mean of each class's normalised prompt embeddings."""
    weights = []
    for name in classnames:
        tok = model.tokenize([t.format(name) for t in templates])
        emb = model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float()
        weights.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(weights)


def zeroshot_eval(model, samples: list[Sample], classnames: list[str], templates: list[str], image_size: int,
                  device, dtype, batch_size: int = 256) -> dict:
    classifier = zeroshot_classifier(model, classnames, templates, device)
    images = embed_images(model, samples, image_size, device, dtype, batch_size)
    return topk_accuracy(images @ classifier.T, torch.tensor([s.label for s in samples]))


# ---------------------------------------------------------------- retrieval

def retrieval_eval(model, files: list[str], captions: list[str], text_to_image: list[int], image_size: int,
                   device, dtype, max_k: int = 10, batch_size: int = 256) -> tuple[dict, dict]:
    """(recall@1/5/10 both ways, {"i2t": curve, "t2i": curve} for k = 1..max_k)."""
    images = embed_images(model, [Sample(f, "") for f in files], image_size, device, dtype, batch_size)
    texts = embed_texts(model, captions, device, batch_size)
    i2t, t2i = retrieval_ranks(images, texts, torch.tensor(text_to_image))
    curves = {"i2t": recall_curve(i2t, max(max_k, 10)), "t2i": recall_curve(t2i, max(max_k, 10))}
    metrics = {f"{d}_r{k}": curves[d][k - 1] for d in ("i2t", "t2i") for k in (1, 5, 10)}
    metrics["mean_recall"] = float(np.mean(list(metrics.values())))
    return metrics, {d: c[:max_k] for d, c in curves.items()}


# ---------------------------------------------------------------- linear probe

def linear_probe_eval(model, path: str, image_size: int, device, dtype, max_per_class: int = 0,
                      heldout_fraction: float = 0.3, seed: int = 0, batch_size: int = 256) -> dict:
    """Probe on `path`'s train split scored on its test split; with one split only, a stratified
    `heldout_fraction` of it is held out. The sklearn fit runs on rank 0 and is handed to every rank."""
    if has_split(path, "train") and has_split(path, "test"):
        train, _ = load_classification(path, "train", max_per_class)
        test, _ = load_classification(path, "test", max_per_class)
    else:
        from sklearn.model_selection import train_test_split
        samples, _ = load_classification(path, "test", max_per_class)
        train, test = train_test_split(samples, test_size=heldout_fraction, random_state=seed,
                                       stratify=[s.label for s in samples])
    train_x = embed_images(model, train, image_size, device, dtype, batch_size).cpu().numpy()
    test_x = embed_images(model, test, image_size, device, dtype, batch_size).cpu().numpy()
    # the fit may outlast train.dist_timeout_s: the other ranks wait without a collective timeout
    return on_rank0(logistic_probe, train_x, np.array([s.label for s in train]), test_x,
                    np.array([s.label for s in test]), seed=seed)


# ---------------------------------------------------------------- all configured evaluations

# name -> fn(model, name, spec, ctx) -> (metrics, curves). Later recipes (fine-tuning
# evaluation of CBMF/UniS-MMC heads) register theirs here and list datasets under the same name.
EVALUATORS: dict[str, Callable] = {}


def register_evaluator(kind: str):
    def wrap(fn):
        EVALUATORS[kind] = fn
        return fn
    return wrap


@register_evaluator("zeroshot")
def _zeroshot(model, name, spec, ctx):
    samples, classnames = load_classification(spec, "test", ctx["max_per_class"])
    return zeroshot_eval(model, samples, classnames, ctx["templates"], ctx["image_size"], ctx["device"],
                         ctx["dtype"], ctx["batch_size"]), {}


@register_evaluator("retrieval")
def _retrieval(model, name, spec, ctx):
    files, captions, owner = load_captions(spec, ctx["max_images"])
    return retrieval_eval(model, files, captions, owner, ctx["image_size"], ctx["device"], ctx["dtype"],
                          ctx["retrieval_k"], ctx["batch_size"])


@register_evaluator("linear_probe")
def _linear_probe(model, name, spec, ctx):
    return linear_probe_eval(model, spec, ctx["image_size"], ctx["device"], ctx["dtype"], ctx["max_per_class"],
                             batch_size=ctx["batch_size"]), {}


def run_evaluations(model, datasets: dict[str, dict[str, str]], *, templates: list[str], image_size: int,
                    device, dtype, max_per_class: int = 0, max_images: int = 0, retrieval_k: int = 10,
                    batch_size: int = 256) -> tuple[dict, dict]:
    """datasets: {kind: {name: spec}} -> ({"kind/name/metric": value}, {"kind/name": curves}).

    Puts the model in eval mode for the duration; every rank must call it."""
    ctx = dict(templates=resolve_templates(templates), image_size=image_size, device=device, dtype=dtype,
               max_per_class=max_per_class, max_images=max_images, retrieval_k=retrieval_k, batch_size=batch_size)
    metrics, curves = {}, {}
    with eval_mode(model):
        for kind, named in datasets.items():
            if kind not in EVALUATORS:
                raise ValueError(f"evaluation kind {kind!r} is unknown (known: {', '.join(EVALUATORS)})")
            for name, spec in named.items():
                m, c = EVALUATORS[kind](model, name, spec, ctx)
                metrics.update({f"{kind}/{name}/{k}": v for k, v in m.items()})
                if c:
                    curves[f"{kind}/{name}"] = c
    return metrics, curves

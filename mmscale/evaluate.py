"""Evaluation of a dual encoder: zero-shot classification (CLIP / CMLA section V), image-text
retrieval (recall@k both ways, the CBMF Fig. 4 curve) and a linear probe on frozen image
embeddings (CLIP / CBMF Table V).

Everything here runs inside training on every rank: image and caption embeddings are computed
on a 1/world shard per rank (padded so every rank runs the same number of forwards, which
ZeRO-3 needs) and all-gathered; class prompts are encoded by every rank. Metrics come out
identical on all ranks. Out of training (tools/eval.py) the same code runs with world = 1.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Subset

from .data import IMAGE_EXTS, CaptionDataset, Sample, collate_images_labels, image_transform
from .losses import rank_and_world

# ---------------------------------------------------------------- prompt templates

# CLIP's CIFAR-10/100 prompt ensemble (openai/CLIP, data/prompts.md); open_clip ships only the
# ImageNet lists.
CIFAR_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
]


def _open_clip_templates(name: str) -> list[str]:
    from open_clip import zero_shot_metadata as meta
    # open_clip stores templates as lambdas; calling one with "{}" gives the format string back
    return [t("{}") for t in getattr(meta, name)]


TEMPLATE_PRESETS: dict[str, Callable[[], list[str]]] = {
    "cmla": lambda: ["a photo of a {}."],  # the CMLA default
    "cifar": lambda: list(CIFAR_TEMPLATES),
    "openai_imagenet": lambda: _open_clip_templates("OPENAI_IMAGENET_TEMPLATES"),
    "simple_imagenet": lambda: _open_clip_templates("SIMPLE_IMAGENET_TEMPLATES"),
}


def resolve_templates(spec: list[str]) -> list[str]:
    """Each entry is a preset name (TEMPLATE_PRESETS) or a template with one "{}"."""
    out = []
    for item in spec:
        if item in TEMPLATE_PRESETS:
            out += TEMPLATE_PRESETS[item]()
        elif "{}" in item:
            out.append(item)
        else:
            raise ValueError(f"eval.templates: {item!r} is neither a preset ({', '.join(TEMPLATE_PRESETS)}) "
                             f"nor a template containing {{}}")
    if not out:
        raise ValueError("eval.templates: empty")
    return out


# ---------------------------------------------------------------- datasets

def _cap_per_class(samples: list[Sample], max_per_class: int) -> list[Sample]:
    if not max_per_class:
        return samples
    seen: dict[int, int] = {}
    kept = []
    for s in samples:
        if seen.get(s.label, 0) < max_per_class:
            seen[s.label] = seen.get(s.label, 0) + 1
            kept.append(s)
    return kept


def _read_classnames(folder: str, default: list[str]) -> list[str]:
    """A classnames.txt (one readable name per line, in sorted folder order) overrides folder names."""
    for candidate in (os.path.join(folder, "classnames.txt"), os.path.join(os.path.dirname(folder), "classnames.txt")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                names = [line.strip() for line in f if line.strip()]
            if len(names) != len(default):
                raise ValueError(f"{candidate}: {len(names)} names for {len(default)} class folders")
            return names
    return [n.replace("_", " ") for n in default]


def _find_cifar_pickles(path: str):
    """The torchvision CIFAR layout: the folder holding the batches or its parent."""
    for sub in ("", "cifar-10-batches-py", "cifar-100-python"):
        folder = os.path.join(path, sub)
        if os.path.isfile(os.path.join(folder, "batches.meta")) or os.path.isfile(os.path.join(folder, "meta")):
            return folder
    return None


def _load_cifar_pickle(folder: str, split: str) -> tuple[list[Sample], list[str]]:
    cifar100 = os.path.isfile(os.path.join(folder, "meta"))
    if cifar100:
        files, meta, names_key, label_key = [split], "meta", "fine_label_names", "fine_labels"
    else:
        files = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
        meta, names_key, label_key = "batches.meta", "label_names", "labels"
    with open(os.path.join(folder, meta), "rb") as f:
        names = [n.replace("_", " ") for n in pickle.load(f, encoding="latin1")[names_key]]
    samples = []
    for name in files:
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: missing CIFAR batch")
        with open(file, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images = batch["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        samples += [Sample(Image.fromarray(im), "", int(y)) for im, y in zip(images, batch[label_key])]
    return samples, names


def load_classification(path: str, split: str = "test", max_per_class: int = 0) -> tuple[list[Sample], list[str]]:
    """(samples, classnames) from CIFAR pickles, `path/<split>/<class>/*` or `path/<class>/*`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: dataset not found")
    pickles = _find_cifar_pickles(path)
    if pickles:
        samples, names = _load_cifar_pickle(pickles, split)
        return _cap_per_class(samples, max_per_class), names
    root = os.path.join(path, split) if os.path.isdir(os.path.join(path, split)) else path
    folders = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
    if not folders:
        raise ValueError(f"{path}: no class folders (expected {split}/<class>/*.jpg, <class>/*.jpg or CIFAR pickles)")
    samples = []
    for label, folder in enumerate(folders):
        files = sorted(f for f in os.listdir(os.path.join(root, folder)) if f.lower().endswith(IMAGE_EXTS))
        files = files[:max_per_class] if max_per_class else files
        samples += [Sample(os.path.join(root, folder, f), "", label) for f in files]
    return samples, _read_classnames(root, folders)


def has_split(path: str, split: str) -> bool:
    pickles = _find_cifar_pickles(path)
    if pickles:
        cifar100 = os.path.isfile(os.path.join(pickles, "meta"))
        return os.path.isfile(os.path.join(pickles, split if cifar100 else
                                           ("test_batch" if split == "test" else "data_batch_1")))
    return os.path.isdir(os.path.join(path, split))


def _split_spec(spec: str) -> tuple[str, str]:
    path, _, images = spec.partition(",")
    return path, images


def load_captions(spec: str, max_images: int = 0) -> tuple[list[str], list[str], list[int]]:
    """COCO captions: (image files, captions, image index of each caption).

    `spec` is `CAPTIONS_JSON[,IMAGE_DIR]`; without IMAGE_DIR the images are looked for next to
    the json's folder as COCO lays them out (annotations/captions_val2017.json -> val2017/).
    """
    path, images = _split_spec(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: captions json not found")
    if not images:
        split = os.path.splitext(os.path.basename(path))[0].replace("captions_", "")
        candidates = [os.path.join(os.path.dirname(path), "..", split), os.path.join(os.path.dirname(path), split),
                      os.path.dirname(path)]
        images = next((c for c in candidates if os.path.isdir(c) and glob.glob(os.path.join(c, "*.*"))), candidates[0])
    with open(path) as f:
        coco = json.load(f)
    entries = sorted(coco["images"], key=lambda im: im["id"])
    entries = entries[:max_images] if max_images else entries
    index = {im["id"]: i for i, im in enumerate(entries)}
    files = [os.path.join(images, im["file_name"]) for im in entries]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: image listed in {path} not found ({len(missing)} missing)")
    pairs = sorted((a["image_id"], a["id"], a["caption"].strip()) for a in coco["annotations"] if a["image_id"] in index)
    return files, [p[2] for p in pairs], [index[p[0]] for p in pairs]


# ---------------------------------------------------------------- embeddings (rank-aware)

def _my_shard(n: int) -> tuple[list[int], int]:
    """This rank's indices, padded so every rank gets the same count (same number of forwards)."""
    rank, world = rank_and_world()
    per = -(-n // world)
    idx = list(range(rank * per, min(n, (rank + 1) * per)))
    return idx + [max(n - 1, 0)] * (per - len(idx)), per


def _gather(local: torch.Tensor, n: int) -> torch.Tensor:
    _, world = rank_and_world()
    if world == 1:
        return local[:n]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)[:n]


@torch.no_grad()
def embed_images(model, samples: list[Sample], image_size: int, device, dtype, batch_size: int = 256) -> torch.Tensor:
    """[N, D] float32 image embeddings on `device`, identical on every rank."""
    idx, _ = _my_shard(len(samples))
    ds = Subset(CaptionDataset(samples, image_transform(image_size, train=False)), idx)
    out = [model.encode_image(images.to(device, dtype)).float()
           for images, _ in DataLoader(ds, batch_size=batch_size, collate_fn=collate_images_labels)]
    return _gather(torch.cat(out), len(samples))


@torch.no_grad()
def embed_texts(model, texts: list[str], device, batch_size: int = 256) -> torch.Tensor:
    idx, _ = _my_shard(len(texts))
    out = []
    for start in range(0, len(idx), batch_size):
        tok = model.tokenize([texts[i] for i in idx[start:start + batch_size]])
        out.append(model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float())
    return _gather(torch.cat(out), len(texts))


# ---------------------------------------------------------------- classification

@torch.no_grad()
def predict(model, dataset, collate, device, dtype, batch_size: int = 256, keep=("logits",)) -> dict:
    """The model's outputs whose names start with one of `keep` (per-sample outputs only) and the
    labels over a labelled dataset, as float32 / int64 CPU tensors identical on every rank (rows
    sharded over the ranks, then all-gathered)."""
    idx, _ = _my_shard(len(dataset))
    parts: dict[str, list] = {}
    for batch in DataLoader(Subset(dataset, idx), batch_size=batch_size, collate_fn=collate):
        batch.pop("skipped", None)
        out = model({k: v.to(device, dtype if v.is_floating_point() else None) for k, v in batch.items()})
        out = {k: v.float() for k, v in out.items() if k.startswith(tuple(keep))}
        out["label"] = batch["label"].to(device)
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return {k: _gather(torch.cat(v), len(dataset)).cpu() for k, v in parts.items()}


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """acc, f1 (positive class 1; binary tasks only), auc (binary: of class 1's probability;
    multi-class: one-vs-rest macro, when every class occurs), f1_weighted and f1_macro."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
    pred = probs.argmax(1)
    out = {"acc": float(accuracy_score(labels, pred)),
           "f1_weighted": float(f1_score(labels, pred, average="weighted", labels=range(probs.shape[1]), zero_division=0)),
           "f1_macro": float(f1_score(labels, pred, average="macro", labels=range(probs.shape[1]), zero_division=0))}
    present = np.unique(labels)
    if probs.shape[1] == 2:
        out["f1"] = float(f1_score(labels, pred, pos_label=1, zero_division=0))
        if len(present) == 2:
            out["auc"] = float(roc_auc_score(labels, probs[:, 1]))
    elif len(present) == probs.shape[1]:
        out["auc"] = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    return out


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


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, topk=(1, 5)) -> dict:
    """{"top{k}": share of rows whose label is among the k highest logits}, k <= #classes."""
    topk = [k for k in topk if k <= logits.shape[1]]
    ranked = logits.topk(max(topk), dim=-1).indices
    hits = ranked == labels.to(ranked.device)[:, None]
    return {f"top{k}": hits[:, :k].any(-1).float().mean().item() for k in topk}


def zeroshot_eval(model, samples: list[Sample], classnames: list[str], templates: list[str], image_size: int,
                  device, dtype, batch_size: int = 256) -> dict:
    classifier = zeroshot_classifier(model, classnames, templates, device)
    images = embed_images(model, samples, image_size, device, dtype, batch_size)
    return topk_accuracy(images @ classifier.T, torch.tensor([s.label for s in samples]))


# ---------------------------------------------------------------- retrieval

def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                    chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the first correct answer per query, for image->text and text->image.

    An image's answer is its best-scored caption (any of its captions counts); a caption's is
    its image. Ties count in the query's favour (only strictly higher scores rank above).
    """
    text_to_image = text_to_image.to(image_emb.device)
    n_img = image_emb.shape[0]
    i2t = torch.empty(n_img, dtype=torch.long)
    t2i = torch.empty(text_emb.shape[0], dtype=torch.long)
    for start in range(0, n_img, chunk):
        sim = image_emb[start:start + chunk] @ text_emb.T  # [c, M]
        rows = torch.arange(start, start + sim.shape[0], device=sim.device)
        own = text_to_image[None, :] == rows[:, None]
        best_own = sim.masked_fill(~own, float("-inf")).max(1, keepdim=True).values
        i2t[start:start + sim.shape[0]] = (sim > best_own).sum(1).cpu()
    for start in range(0, text_emb.shape[0], chunk):
        sim = text_emb[start:start + chunk] @ image_emb.T  # [c, N]
        own = sim.gather(1, text_to_image[start:start + chunk, None])
        t2i[start:start + sim.shape[0]] = (sim > own).sum(1).cpu()
    return i2t, t2i


def recall_curve(ranks: torch.Tensor, max_k: int) -> list[float]:
    """recall@k for k = 1..max_k."""
    return [(ranks < k).float().mean().item() for k in range(1, max_k + 1)]


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

def fit_logistic(train_x: np.ndarray, train_y: np.ndarray, cs=(0.01, 0.1, 1.0, 10.0), seed: int = 0):
    """L2-regularised logistic regression with C picked on a stratified 20% validation split of
    the training rows, refitted on all of them. Returns (classifier, C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import train_test_split
    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=0.2, random_state=seed,
                                                  stratify=train_y)
    scores = {}
    for c in cs:
        clf = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(fit_x, fit_y)
        scores[c] = accuracy_score(val_y, clf.predict(val_x))
    best = max(cs, key=lambda c: scores[c])
    return LogisticRegression(C=best, max_iter=1000, random_state=seed).fit(train_x, train_y), float(best)


def logistic_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   cs=(0.01, 0.1, 1.0, 10.0), seed: int = 0) -> dict:
    """CLIP's linear probe on frozen features: fit_logistic, scored once on the test features."""
    clf, c = fit_logistic(train_x, train_y, cs, seed)
    return {"top1": float((clf.predict(test_x) == test_y).mean()), "C": c}


def linear_probe_eval(model, path: str, image_size: int, device, dtype, max_per_class: int = 0,
                      heldout_fraction: float = 0.3, seed: int = 0, batch_size: int = 256) -> dict:
    """Probe on `path`'s train split scored on its test split; with one split only, a stratified
    `heldout_fraction` of it is held out. The sklearn fit runs on rank 0 and is broadcast."""
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
    rank, world = rank_and_world()
    result = [None]
    if rank == 0:
        result[0] = logistic_probe(train_x, np.array([s.label for s in train]), test_x,
                                   np.array([s.label for s in test]), seed=seed)
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


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
    was_training = model.training
    model.eval()
    try:
        for kind, named in datasets.items():
            if kind not in EVALUATORS:
                raise ValueError(f"evaluation kind {kind!r} is unknown (known: {', '.join(EVALUATORS)})")
            for name, spec in named.items():
                m, c = EVALUATORS[kind](model, name, spec, ctx)
                metrics.update({f"{kind}/{name}/{k}": v for k, v in m.items()})
                if c:
                    curves[f"{kind}/{name}"] = c
    finally:
        model.train(was_training)
    return metrics, curves

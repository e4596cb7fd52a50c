"""Evaluation data: prompt templates (CMLA's, CLIP's CIFAR ensemble, open_clip's ImageNet lists),
labelled image sets (CIFAR pickles or class folders) and COCO-format caption sets."""
from __future__ import annotations

import glob
import json
import os
import pickle
from typing import Callable

from PIL import Image

from ..data.images import Sample, scan_class_folders


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
    files, labels, folders = scan_class_folders(root, max_per_class)
    if not folders:
        raise ValueError(f"{path}: no class folders (expected {split}/<class>/*.jpg, <class>/*.jpg or CIFAR pickles)")
    return [Sample(f, "", y) for f, y in zip(files, labels)], _read_classnames(root, folders)


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

"""Curate a shard set in one resharding pass: exact and near-duplicate images, decontamination
against evaluation sets, optional duplicate captions and CLIP-score filtering (DataComp's baseline).

    mmscale-curate /data/cc3m /data/cc3m-curated \\
        --decontaminate coco=/data/coco/annotations/captions_val2017.json imagenet=/data/imagenet/val \\
        --clip-model runs/cmla/export --clip-keep-fraction 0.7 --workers 16
    torchrun --nproc_per_node 8 tools/curate.py ...    (each rank hashes and scores its own shards)

IN_SHARDS: a folder written by mmscale-build-shards (its _meta/shards.json), or a folder of .tar
shards. Writes OUT_SHARDS/{00000..}.tar (the kept samples in input order, every tar member's
bytes as they were), OUT_SHARDS/_meta/shards.json (the index `data.type: shards` trains from),
_meta/summary.json (kept and dropped counts by reason; also printed) and _meta/curation.parquet
(every input sample: key, shard, offset, verdict, the kept duplicate it was dropped for, CLIP
score). Work files live in _meta/curate/: rerunning the same command continues where it stopped.
Which duplicate is kept: the one with the most pixels, then the first in input order. Exit code
2 with one line for a bad folder, an unreadable model, an empty result. docs/DATA.md has more.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from mmscale.data.curate import CurateError, CurateOptions, EvalSet, curate


def _model_stamp(path: str) -> str:
    """The model path and its files' sizes and times: the scores are recomputed when it changes."""
    h = hashlib.blake2b(digest_size=8)
    for folder, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            st = os.stat(os.path.join(folder, f))
            h.update(f"{os.path.relpath(os.path.join(folder, f), path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return f"{os.path.abspath(path)}@{h.hexdigest()}"


class ExportScorer:
    """CLIP scores from an mmscale dual encoder (an export, a run or a checkpoint): its eval
    transform, its own tokenizer, the cosine of its two embeddings."""

    def __init__(self, path: str, device):
        from mmscale.data.images import image_transform
        from mmscale.export import load_run_model
        model, cfg, _ = load_run_model(path)
        if cfg.task != "clip":
            raise CurateError(f"--clip-model {path}: a task {cfg.task} model; CLIP scores need a task clip dual encoder")
        self.model, self.device, self.name = model.to(device), device, _model_stamp(path)
        self.preprocess = image_transform(cfg.model.image.image_size, train=False)

    def score(self, images, captions):
        import torch.nn.functional as F
        from mmscale.data.images import normalize_images
        tok = self.model.tokenize(captions)
        image = self.model.encode_image(normalize_images(images.to(self.device)))
        text = self.model.encode_text(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
        return F.cosine_similarity(image.float(), text.float(), dim=-1)


class OpenClipScorer:
    """CLIP scores from an open_clip `local-dir:` folder (offline): its preprocess and tokenizer."""

    def __init__(self, spec: str, device):
        import open_clip
        model, _, self.preprocess = open_clip.create_model_and_transforms(spec)
        self.tokenizer, self.device = open_clip.get_tokenizer(spec), device
        self.model, self.name = model.eval().to(device), _model_stamp(spec[len("local-dir:"):])

    def score(self, images, captions):
        import torch.nn.functional as F
        image = self.model.encode_image(images.to(self.device))
        text = self.model.encode_text(self.tokenizer(captions).to(self.device))
        return F.cosine_similarity(image.float(), text.float(), dim=-1)


def load_scorer(path: str, device):
    """An mmscale export / run / checkpoint, or `local-dir:FOLDER` for open_clip; one line if it
    cannot be loaded."""
    if ":" in path.split(os.sep)[0] and not path.startswith("local-dir:"):
        raise CurateError(f"--clip-model {path}: only local models (an mmscale export or run, or local-dir:FOLDER "
                          f"for open_clip): nothing is downloaded")
    folder = path[len("local-dir:"):] if path.startswith("local-dir:") else path
    if not os.path.isdir(folder):
        raise CurateError(f"--clip-model {path}: no such folder")
    try:
        return OpenClipScorer(path, device) if path.startswith("local-dir:") else ExportScorer(path, device)
    except CurateError:
        raise
    except Exception as e:  # a folder that is not a model fails in many ways (json, yaml, safetensors, torch)
        raise CurateError(f"--clip-model {path}: cannot load a model from it ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


def eval_set(item: str) -> EvalSet:
    """NAME=PATH: a COCO captions .json (images beside it as COCO lays them out, or JSON,IMAGE_DIR),
    a shard folder (_meta/shards.json), or class folders (PATH/test/<class>/* or PATH/<class>/*)."""
    from mmscale.data.indexed_shards import META, read_index
    from mmscale.eval.datasets import load_captions, load_classification
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise CurateError(f"--decontaminate {item!r}: expected NAME=PATH")
    try:
        if path.split(",")[0].endswith(".json"):
            return EvalSet(name, path, images=load_captions(path)[0])
        if os.path.isfile(os.path.join(path, META, "shards.json")):
            return EvalSet(name, path, tars=[s["url"] for s in read_index(path)])
        return EvalSet(name, path, images=[s.image for s in load_classification(path, "test")[0]])
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise CurateError(f"--decontaminate {name}={path}: {e} (give a COCO captions .json, a shard folder or "
                          f"class folders)") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mmscale-curate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_shards", help="the shard folder to curate")
    p.add_argument("out_shards", help="the curated shard folder (created; rerun the same command to resume)")
    p.add_argument("--near-dup-radius", type=int, default=4,
                   help="drop images whose 64-bit pHash is within this many bits of a kept image's; resized and "
                        "re-encoded copies land within 4, distinct photos rarely under 10; -1: only exact "
                        "duplicates (default: 4)")
    p.add_argument("--decontaminate", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                   help="drop training images near an image of these evaluation sets: a COCO captions .json, a shard "
                        "folder or class folders, counted per NAME (default: none)")
    p.add_argument("--decontaminate-radius", type=int, default=None,
                   help="the pHash radius for --decontaminate (default: --near-dup-radius, 4 if that is -1)")
    p.add_argument("--dedup-captions", action="store_true",
                   help="also drop pairs whose caption equals a kept pair's once case, punctuation and spacing are "
                        "taken out (off by default: distinct images often share a generic caption)")
    p.add_argument("--clip-model", default=None,
                   help="score every pair's image-caption cosine with this model: an mmscale export or run folder, "
                        "or local-dir:FOLDER (open_clip); scores land in _meta/curation.parquet (default: none)")
    p.add_argument("--clip-threshold", type=float, default=None,
                   help="keep pairs whose CLIP score is at least this (default: none)")
    p.add_argument("--clip-keep-fraction", type=float, default=None,
                   help="keep this top fraction of the pairs the other filters left, by CLIP score (DataComp: 0.3) "
                        "(default: none)")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per output shard (default: 10000)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes per rank for hashing, writing and the scorer's image loading (default: 1)")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per CLIP-scoring batch (default: 256)")
    p.add_argument("--dist-timeout", type=float, default=86400,
                   help="seconds a rank may wait for the others between phases under torchrun (default: 86400)")
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        summary = run(args)
    except CurateError as e:
        if rank == 0:
            print(f"curate: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps(summary, indent=2))
    return 0


def run(args) -> dict:
    if args.clip_threshold is not None and args.clip_keep_fraction is not None:
        raise CurateError("--clip-threshold and --clip-keep-fraction: give one of them")
    if (args.clip_threshold is not None or args.clip_keep_fraction is not None) and not args.clip_model:
        raise CurateError("--clip-threshold / --clip-keep-fraction need --clip-model")
    if args.clip_keep_fraction is not None and not 0 < args.clip_keep_fraction <= 1:
        raise CurateError(f"--clip-keep-fraction {args.clip_keep_fraction}: must be in (0, 1]")
    if args.shard_size < 1 or args.workers < 1 or args.batch_size < 1:
        raise CurateError("--shard-size, --workers and --batch-size must be at least 1")
    radius = args.decontaminate_radius
    if radius is None:
        radius = args.near_dup_radius if args.near_dup_radius >= 0 else 4
    opts = CurateOptions(near_dup_radius=args.near_dup_radius, dedup_captions=args.dedup_captions,
                         decontaminate_radius=radius,
                         clip_threshold=args.clip_threshold, clip_keep_fraction=args.clip_keep_fraction,
                         shard_size=args.shard_size, workers=args.workers, batch_size=args.batch_size)
    sets = [eval_set(item) for item in args.decontaminate]
    if len({s.name for s in sets}) < len(sets):
        raise CurateError("--decontaminate: every NAME once")
    scorer = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.clip_model:
        from mmscale.dist import current_device, init_distributed
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            init_distributed(args.dist_timeout)
        if args.clip_model:
            scorer = load_scorer(args.clip_model, current_device())
    return curate(args.in_shards, args.out_shards, opts, sets, scorer)


if __name__ == "__main__":
    sys.exit(main())

"""WebDataset shards: built from URL + caption lists with img2dataset, read back by index.

CMLA's filters: captions that are empty, too short or too long are dropped before anything is
downloaded; images under 200x200 (before resizing) and images that do not decode are dropped by
img2dataset's resizer (`min_image_size`; cv2 rejects truncated files). What img2dataset writes is
the training set: its per-shard `*_stats.json` give every counter, and a wids index
(`_meta/shards.json`, sample counts per shard) lets training read the shards by index, which is
what makes resume exact. Both live in `_meta/` because img2dataset's resume parses every top-level
`*.json` of the output folder as a shard's stats. img2dataset's incremental mode makes a second run on the same output finish
the missing shards instead of starting over.
"""
from __future__ import annotations

import glob
import json
import os
from collections import Counter
from dataclasses import dataclass

from PIL import Image

from ..files import atomic_path, atomic_write_json
from .images import KeyedDataset

META = "_meta"
# img2dataset's resizer reports these; they are filters, not download failures
RESIZER_FILTERS = {"image too small": "image_too_small", "Image decoding error": "undecodable",
                   "image area too large": "image_area_too_large", "aspect ratio too large": "aspect_ratio_too_large"}


@dataclass
class BuildOptions:
    image_size: int = 256
    resize_mode: str = "border"  # img2dataset: no, border, keep_ratio, keep_ratio_largest, center_crop
    min_image_size: int = 200
    min_caption_words: int = 1
    max_caption_words: int = 64
    processes: int = 1
    threads: int = 16
    shard_size: int = 10000
    timeout: int = 10
    retries: int = 0
    caption_col: str = "caption"
    url_col: str = "url"
    # classification shards: this column's class is stored as "label" (an integer) in each
    # sample's .json; class names that are not integers are numbered in sorted order and listed
    # in _meta/classes.json
    label_col: str = ""


def read_pairs(path: str, caption_col: str = "caption", url_col: str = "url", label_col: str = ""):
    """A DataFrame with `caption` and `url` (and `label`). CC3M's TSV has no header: caption<TAB>url."""
    import pandas as pd
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input: file not found: {path}")
    if path.endswith(".parquet"):
        df = pd.read_parquet(path)
    elif path.endswith(".tsv"):
        with open(path) as f:
            first = f.readline().rstrip("\n").split("\t")
        headerless = len(first) >= 2 and first[1].startswith(("http://", "https://"))
        if headerless:
            df = pd.read_csv(path, sep="\t", header=None, names=[caption_col, url_col], quoting=3,
                             keep_default_na=False, dtype=str)
        else:
            df = pd.read_csv(path, sep="\t", keep_default_na=False, dtype=str)
    else:
        df = pd.read_csv(path, keep_default_na=False, dtype=str)
    for col in (caption_col, url_col) + ((label_col,) if label_col else ()):
        if col not in df.columns:
            raise ValueError(f"input: {path} has no column {col!r} (columns: {list(df.columns)})")
    names = {caption_col: "caption", url_col: "url", **({label_col: "label"} if label_col else {})}
    return df.rename(columns=names)[list(names.values())].fillna("")


def number_labels(labels) -> tuple[list[int], list[str] | None]:
    """Integer class numbers for a label column, and the class names when they were not numbers."""
    values = [str(v).strip() for v in labels]
    if all(v.lstrip("-").isdigit() for v in values):
        return [int(v) for v in values], None
    names = sorted(set(values))
    index = {n: i for i, n in enumerate(names)}
    return [index[v] for v in values], names


def caption_verdict(caption: str, opts: BuildOptions) -> str | None:
    words = caption.split()
    if not words:
        return "caption_empty"
    if len(words) < opts.min_caption_words:
        return "caption_too_short"
    if len(words) > opts.max_caption_words:
        return "caption_too_long"
    return None


def summarize(out_dir: str, requested: int, caption_filtered: Counter) -> dict:
    paths = sorted(glob.glob(os.path.join(out_dir, "*_stats.json")))
    stats = [json.load(open(p)) for p in paths]
    status = Counter()
    for s in stats:
        status.update(s.get("status_dict", {}))
    attempted = sum(s["count"] for s in stats)
    failed = {msg: n for msg, n in status.items() if msg != "success" and msg not in RESIZER_FILTERS}
    filtered = dict(caption_filtered)
    filtered.update({RESIZER_FILTERS[m]: n for m, n in status.items() if m in RESIZER_FILTERS})
    # 00012_stats.json describes 00012.tar
    shards = [{"url": os.path.basename(p)[:-len("_stats.json")] + ".tar", "nsamples": s["successes"]}
              for p, s in zip(paths, stats) if s["successes"] > 0]
    return {
        "requested": requested,
        "attempted": attempted,
        "downloaded": attempted - sum(failed.values()),
        "failed": dict(sorted(failed.items())),
        "filtered": dict(sorted(filtered.items())),
        "kept": sum(s["successes"] for s in stats),
        "shards": len(shards),
        "shard_index": "_meta/shards.json",
        "_shardlist": shards,
    }


def write_index(out_dir: str, shardlist: list[dict]) -> str:
    """wids-style shard index; urls are relative to the shards folder."""
    path = os.path.join(out_dir, META, "shards.json")
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": os.path.basename(os.path.abspath(out_dir)),
             "shardlist": shardlist}
    atomic_write_json(path, index, indent=1)
    return path


def build_shards(input_path: str, out_dir: str, opts: BuildOptions) -> dict:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import
    from img2dataset import download
    df = read_pairs(input_path, opts.caption_col, opts.url_col, opts.label_col)
    classes = None
    if opts.label_col:
        df["label"], classes = number_labels(df["label"])
    verdicts = df["caption"].map(lambda c: caption_verdict(c, opts))
    caption_filtered = Counter(v for v in verdicts if v)
    keep = df[verdicts.isna()].reset_index(drop=True)
    os.makedirs(out_dir, exist_ok=True)
    # a deterministic file, so a rerun hands img2dataset the same shards and it resumes
    url_list = os.path.join(out_dir, META, "urls.parquet")
    with atomic_path(url_list) as tmp:
        keep.to_parquet(tmp, index=False)
    if len(keep):
        download(url_list=url_list, output_folder=out_dir, output_format="webdataset", input_format="parquet",
                 url_col="url", caption_col="caption", image_size=opts.image_size, resize_mode=opts.resize_mode,
                 min_image_size=opts.min_image_size, processes_count=opts.processes, thread_count=opts.threads,
                 number_sample_per_shard=opts.shard_size, timeout=opts.timeout, retries=opts.retries,
                 incremental_mode="incremental", enable_wandb=False, distributor="multiprocessing",
                 save_additional_columns=["label"] if opts.label_col else None)
    summary = summarize(out_dir, len(df), caption_filtered)
    write_index(out_dir, summary.pop("_shardlist"))
    if classes:
        atomic_write_json(os.path.join(out_dir, META, "classes.json"), classes, indent=1)
    atomic_write_json(os.path.join(out_dir, META, "summary.json"), summary, indent=1)
    return summary


def read_index(folder: str) -> list[dict]:
    """[{url: absolute tar path, nsamples}] of a folder written by build_shards."""
    path = os.path.join(folder, META, "shards.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.shards: no shard index {path} (build it with tools/build_shards.py)")
    with open(path) as f:
        index = json.load(f)
    return [{"url": os.path.join(folder, s["url"]), "nsamples": s["nsamples"]} for s in index["shardlist"]]


def _in_place(url: str) -> str:
    return url


class ShardDataset(KeyedDataset):
    """Random access into the tar shards of tools/build_shards.py through webdataset's wids
    index, so the exact, resumable BatchStream works on shards as on folders."""

    def __init__(self, folder: str, transform):
        super().__init__(transform)
        self.shardlist = read_index(folder)
        self.size = sum(s["nsamples"] for s in self.shardlist)
        self._ds = None  # opened lazily: each loader worker needs its own file handles

    def __len__(self):
        return self.size

    def _dataset(self):
        if self._ds is None:
            import contextlib
            import io
            import wids
            with contextlib.redirect_stderr(io.StringIO()):  # wids prints a banner per open
                # read local shards in place: wids' default copies them into a cache keyed by
                # path, which serves stale data once a folder is rebuilt
                self._ds = wids.ShardListDataset(self.shardlist, transformations=[], localname=_in_place)
        return self._ds

    def name(self, i):
        return f"sample {i} of {len(self.shardlist)} shards"

    def load(self, i):
        sample = self._dataset()[i]
        image_key = next((k for k in (".jpg", ".jpeg", ".png", ".webp") if k in sample), None)
        if image_key is None or ".txt" not in sample:
            raise ValueError(f"{sample.get('__key__')} has no image or no .txt")
        image = Image.open(sample[image_key])
        image.load()
        return image, sample[".txt"].read().decode("utf-8").strip(), self._label(sample)

    def label(self, i) -> int:
        return self._label(self._dataset()[i])  # reads the tar members, decodes no image

    @staticmethod
    def _label(sample: dict) -> int:
        """The class of a classification shard: a .cls member, or "label" in img2dataset's .json."""
        if ".cls" in sample:
            return int(sample[".cls"].read().decode().strip())
        if ".json" in sample:
            return int(json.loads(sample[".json"].read()).get("label", -1))
        return -1

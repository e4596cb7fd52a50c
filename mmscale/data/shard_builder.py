"""Data preparation: WebDataset shards built from URL + caption lists with img2dataset.

CMLA's filters: captions that are empty, too short or too long are dropped before anything is
downloaded; images under 200x200 (before resizing) and images that do not decode are dropped by
img2dataset's resizer (`min_image_size`; cv2 rejects truncated files). What img2dataset writes is
the training set: its per-shard `*_stats.json` give every counter, and the shard index
(indexed_shards.write_index: sample counts per shard) lets training read the shards by index,
which is what makes resume exact. Both live in `_meta/` because img2dataset's resume parses every
top-level `*.json` of the output folder as a shard's stats. img2dataset's incremental mode makes a
second run on the same output finish the missing shards instead of starting over.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass

from ..files import atomic_path, atomic_write_json
from .indexed_shards import META, write_index

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
    # img2dataset's distributors: one machine's processes, or a Spark or Ray cluster whose workers
    # all write into the output folder (shared storage)
    distributor: str = "multiprocessing"
    spark_master: str = ""  # pyspark: the master URL; empty: $SPARK_MASTER, else local[processes]
    ray_address: str = ""  # ray: the cluster address; empty: $RAY_ADDRESS, else a local Ray


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


DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")


@contextlib.contextmanager
def _distributor(opts: BuildOptions):
    """The cluster img2dataset's distributor runs on: a Spark session (img2dataset uses the active
    one; ours asks for no 16 GB driver) or a Ray connection, made here and closed after."""
    if opts.distributor == "pyspark":
        try:
            from pyspark.sql import SparkSession
        except ImportError:
            raise ValueError("--distributor pyspark: pip install pyspark (and a Java 17+ runtime)") from None
        master = opts.spark_master or os.environ.get("SPARK_MASTER") or f"local[{opts.processes}]"
        if master.startswith("local"):  # Spark's Python workers: this interpreter (img2dataset is here)
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        spark = SparkSession.builder.master(master).appName("mmscale-build-shards").getOrCreate()
        try:
            yield
        finally:
            spark.stop()
    elif opts.distributor == "ray":
        try:
            import ray
        except ImportError:
            raise ValueError("--distributor ray: pip install ray") from None
        ray.init(address=opts.ray_address or os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True)
        try:
            yield
        finally:
            ray.shutdown()
    else:
        yield


def build_shards(input_path: str, out_dir: str, opts: BuildOptions) -> dict:
    if opts.distributor not in DISTRIBUTORS:
        raise ValueError(f"--distributor: {opts.distributor!r} is not one of {', '.join(DISTRIBUTORS)}")
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
        with _distributor(opts):
            download(url_list=url_list, output_folder=out_dir, output_format="webdataset", input_format="parquet",
                     url_col="url", caption_col="caption", image_size=opts.image_size, resize_mode=opts.resize_mode,
                     min_image_size=opts.min_image_size, processes_count=opts.processes, thread_count=opts.threads,
                     number_sample_per_shard=opts.shard_size, timeout=opts.timeout, retries=opts.retries,
                     incremental_mode="incremental", enable_wandb=False, distributor=opts.distributor,
                     save_additional_columns=["label"] if opts.label_col else None)
    summary = summarize(out_dir, len(df), caption_filtered)
    write_index(out_dir, summary.pop("_shardlist"))
    if classes:
        atomic_write_json(os.path.join(out_dir, META, "classes.json"), classes, indent=1)
    atomic_write_json(os.path.join(out_dir, META, "summary.json"), summary, indent=1)
    return summary

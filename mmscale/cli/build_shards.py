"""Build filtered WebDataset shards from a URL + caption list with img2dataset.

    mmscale-build-shards Train_GCC-training.tsv /data/cc3m --processes 16 --threads 64

INPUT: CC3M-style TSV (caption<TAB>url, no header) or a CSV/TSV/parquet with named columns.
Writes OUT_DIR/{00000..}.tar (img2dataset's webdataset output), OUT_DIR/_meta/shards.json (the
index that `data.type: shards, data.shards: OUT_DIR` trains from) and OUT_DIR/_meta/summary.json
(also printed). Rerunning on the same OUT_DIR resumes. Exit code 2 with one line on bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from mmscale.data.shard_builder import BuildOptions, build_shards

HELP = {
    "image_size": "side of the stored images in pixels, after resizing",
    "resize_mode": "img2dataset's resize mode: no, border, keep_ratio, keep_ratio_largest, center_crop",
    "min_image_size": "drop images whose smaller side is below this many pixels, before resizing (CMLA: 200)",
    "min_caption_words": "drop captions with fewer words, before download",
    "max_caption_words": "drop captions with more words, before download",
    "processes": "download processes",
    "threads": "download threads per process",
    "shard_size": "samples per .tar shard",
    "timeout": "seconds per download before it counts as failed",
    "retries": "download retries per URL",
    "caption_col": "caption column of a CSV/parquet or headed TSV",
    "url_col": "URL column of a CSV/parquet or headed TSV",
    "label_col": "class column: each sample then carries its class (for task classify); empty: none",
    "distributor": "img2dataset's distributor: multiprocessing (this machine), pyspark or ray (a cluster whose "
                   "workers all write into OUT_DIR: shared storage)",
    "spark_master": "pyspark: the Spark master URL, e.g. spark://head:7077; empty: $SPARK_MASTER, else "
                    "local[--processes]",
    "ray_address": "ray: the cluster address, e.g. head:6379; empty: $RAY_ADDRESS, else a local Ray",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mmscale-build-shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="caption + URL list: .tsv, .csv or .parquet")
    p.add_argument("out_dir", help="output folder (created; an existing one is resumed)")
    for f in dataclasses.fields(BuildOptions):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{HELP[f.name]} (default: {f.default!r})")
    args = vars(p.parse_args(argv))
    opts = BuildOptions(**{f.name: args[f.name] for f in dataclasses.fields(BuildOptions)})
    try:
        summary = build_shards(args["input"], args["out_dir"], opts)
    except (FileNotFoundError, ValueError) as e:
        print(f"build_shards: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

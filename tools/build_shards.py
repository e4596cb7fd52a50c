#!/usr/bin/env python
"""Build filtered WebDataset shards from a URL + caption list with img2dataset.

    python tools/build_shards.py Train_GCC-training.tsv /data/cc3m --processes 16 --threads 64

INPUT: CC3M-style TSV (caption<TAB>url, no header) or a CSV/TSV/parquet with named columns.
Writes OUT_DIR/{00000..}.tar (img2dataset's webdataset output), OUT_DIR/_meta/shards.json (the
index that `data.type: shards, data.shards: OUT_DIR` trains from) and OUT_DIR/_meta/summary.json
(also printed). Rerunning on the same OUT_DIR resumes.
"""
import argparse
import dataclasses
import json
import sys

from mmscale.shards import BuildOptions, build_shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("out_dir")
    for f in dataclasses.fields(BuildOptions):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
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

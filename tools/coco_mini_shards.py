#!/usr/bin/env python
"""Shards of ../shared/data/coco-mini's train2017 photos (one sample per caption), built the way
a user builds CC3M's: mmscale's build_shards (img2dataset) downloading every URL, here from a
loopback HTTP server over the photo folder. For the loader benchmark in docs/DATA.md.

    python tools/coco_mini_shards.py /tmp/coco256 --image-size 256
"""
import argparse
import functools
import json
import os
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from mmscale.data.shard_builder import BuildOptions, build_shards


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the shards folder to write")
    p.add_argument("--coco", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "coco-mini"),
                   help="the COCO-MINI folder (default: ../shared/data/coco-mini beside the repository)")
    p.add_argument("--image-size", type=int, default=256, help="stored image side in pixels (default: 256)")
    args = p.parse_args(argv)
    ann_file = os.path.join(args.coco, "annotations", "captions_train2017.json")
    if not os.path.isfile(ann_file):
        print(f"coco_mini_shards: {ann_file} not found (--coco)", file=sys.stderr)
        return 2
    ann = json.load(open(ann_file))
    files = {i["id"]: i["file_name"] for i in ann["images"]}
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=os.path.join(args.coco, "train2017")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    os.makedirs(args.out, exist_ok=True)
    tsv = os.path.join(args.out, "urls.tsv")
    with open(tsv, "w") as f:
        for a in ann["annotations"]:
            f.write(f"{' '.join(a['caption'].split())}\t{url}/{files[a['image_id']]}\n")
    try:
        summary = build_shards(tsv, args.out, BuildOptions(image_size=args.image_size, shard_size=1000, processes=2,
                                                           threads=8))
    finally:
        server.shutdown()
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

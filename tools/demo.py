#!/usr/bin/env python
"""The fresh-machine demo: real data -> loopback HTTP -> img2dataset shards -> 2-rank training
-> zero-shot accuracy.

1. writes real labelled images as 224 px PNGs with captions from the class names and serves
   them on 127.0.0.1: CIFAR-10 (../shared/data/cifar10/train) when that folder is there, else
   scikit-learn's handwritten digits ("a photo of the number seven."),
2. builds filtered WebDataset shards from the URL list with tools/build_shards.py's library,
3. trains recipes/tiny.yaml on those shards on 2 ranks with the deepspeed launcher (CPU works),
4. rebuilds the exported model and prints zero-shot top-1/top-5 on held-out images the run
   never saw (CIFAR-10 test images, or the held-out digits; 10 classes, chance 0.10 / 0.50).
"""
import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: recipes/, mmscale/train.py


def serve(folder: str) -> tuple[ThreadingHTTPServer, str]:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "demo"),
                   help="working folder, emptied first (default: runs/demo)")
    p.add_argument("--ranks", type=int, default=2, help="training processes (default: 2)")
    p.add_argument("--source", choices=["auto", "digits", "cifar10"], default="auto",
                   help="images to train on; auto: cifar10 when ../shared/data/cifar10 exists, else digits (default: auto)")
    p.add_argument("--per-class", type=int, default=300, help="cifar10: training images per class (default: 300)")
    p.add_argument("overrides", nargs="*", help="extra overrides of recipes/tiny.yaml, e.g. train.epochs=5 (default: none)")
    args = p.parse_args()

    from PIL import Image
    from mmscale.config import DataConfig, load_config
    from mmscale.data.images import load_splits
    from mmscale.data.shard_builder import BuildOptions, build_shards

    shutil.rmtree(args.work, ignore_errors=True)
    site = os.path.join(args.work, "site")
    os.makedirs(site)
    cifar = os.path.join(ROOT, "..", "shared", "data", "cifar10")
    source = args.source if args.source != "auto" else ("cifar10" if os.path.isdir(cifar) else "digits")
    overrides = list(args.overrides)
    if source == "cifar10":
        template = "a photo of a {}."
        train = load_splits(DataConfig(type="imagefolder", root=os.path.join(cifar, "train"), caption_template=template,
                                       max_per_class=args.per_class, eval_fraction=0.0)).train
        held = load_splits(DataConfig(type="imagefolder", root=os.path.join(cifar, "test"), caption_template=template,
                                      max_per_class=100, eval_fraction=0.0))
        eval_samples, classnames = held.train, held.classnames
        overrides = [f"data.caption_template={template}", f"eval.templates=['{template}']", "train.epochs=12"] + overrides
    else:
        template = load_config(os.path.join(ROOT, "recipes", "tiny.yaml")).data.caption_template
        splits = load_splits(DataConfig(type="digits", caption_template=template, eval_fraction=0.2))
        train, eval_samples, classnames = splits.train, splits.eval, splits.classnames
    rows = []
    for i, sample in enumerate(train):
        # small images upscaled past CMLA's 200x200 minimum, as a web image would be
        image = sample.image if isinstance(sample.image, Image.Image) else Image.open(sample.image)
        image.resize((224, 224), Image.NEAREST if source == "digits" else Image.BICUBIC).save(
            os.path.join(site, f"{i:05d}.png"))
        rows.append(f"{sample.caption}\t{{url}}/{i:05d}.png")
    httpd, url = serve(site)
    tsv = os.path.join(args.work, "pairs.tsv")
    with open(tsv, "w") as f:
        f.write("\n".join(r.replace("{url}", url) for r in rows) + "\n")

    shards = os.path.join(args.work, "shards")
    print(f"[demo] building shards from {len(rows)} URLs served at {url}", flush=True)
    summary = build_shards(tsv, shards, BuildOptions(image_size=32, shard_size=500, threads=16))
    httpd.shutdown()
    print("[demo] shards:", json.dumps(summary), flush=True)

    run_dir = os.path.join(args.work, "run")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher, "--num_gpus", str(args.ranks), os.path.join(ROOT, "mmscale", "train.py"),
           os.path.join(ROOT, "recipes", "tiny.yaml"), "data.type=shards", f"data.shards={shards}",
           f"train.run_dir={run_dir}", *overrides]
    print("[demo] training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)

    import torch
    from mmscale.eval import zeroshot_eval
    from mmscale.export import load_export
    model = load_export(os.path.join(run_dir, "export"))
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    metrics = zeroshot_eval(model, eval_samples, classnames, [template], cfg.model.image.image_size,
                            torch.device("cpu"), torch.float32)
    print(f"[demo] zero-shot on {len(eval_samples)} held-out {source} images: top-1 {metrics['top1']:.3f}, "
          f"top-5 {metrics['top5']:.3f} (chance 0.100 / 0.500)")
    with open(os.path.join(args.work, "zeroshot.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

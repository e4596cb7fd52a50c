"""Data-loader throughput: images/s for decode + augment + tokenize, per worker count.

Builds the recipe's own training loader (same dataset, transforms, tokenizer, batching) and
times batches after a warm-up, so the GPU work can tell whether the loader starves the GPU:
compare images/s per worker x workers per GPU with the trainer's samples/s per GPU.

    mmscale-bench-loader recipes/tiny.yaml data.type=coco \\
        data.root=../shared/data/coco-mini/val2017 \\
        data.captions=../shared/data/coco-mini/annotations/captions_val2017.json \\
        model.image.image_size=224 model.image.kwargs.img_size=224 --workers 0 1 2
"""
import argparse
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mmscale-bench-loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a task clip recipe")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. data.num_workers=2 (default: none)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to time (default: 0 1 2)")
    p.add_argument("--batch", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--batches", type=int, default=10, help="timed batches per worker count, after one warm-up (default: 10)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer
    from mmscale.config import ConfigError, load_config
    from mmscale.models.towers import HFTokenize, resolve_text_path
    from mmscale.tasks import ClipTask

    torch.set_num_threads(1)  # one worker = one core, as in training
    try:
        cfg = load_config(args.recipe, args.overrides + [f"train.global_batch_size={args.batch}"])
    except ConfigError as e:
        print(f"bench_loader: config error: {e}", file=sys.stderr)
        return 2
    if cfg.task != "clip":
        raise SystemExit(f"bench_loader: {args.recipe} is a task {cfg.task} recipe; this times task clip loaders")
    if cfg.model.text.source != "hf":
        raise SystemExit("bench_loader: only HF text towers are supported (model.text.source)")
    tokenize = HFTokenize(AutoTokenizer.from_pretrained(resolve_text_path(cfg.model.text.name)), cfg.model.text.max_length)

    class TokenizerOnly:  # the stream needs only the text tower's tokenizer
        class text_tower:
            @staticmethod
            def tokenize_fn():
                return tokenize

    print(f"{'workers':>7} {'images/s':>10} {'per worker':>10}   image {cfg.model.image.image_size}px, "
          f"batch {args.batch}, {cfg.data.type}")
    for workers in args.workers:
        cfg.data.num_workers = workers
        stream = ClipTask(cfg).train_stream(TokenizerOnly, rank=0, world=1)
        it = iter(stream)
        next(it)  # start-up and worker spawn are not throughput
        n = args.batches
        tic = time.perf_counter()
        for _ in range(n):
            next(it)
        rate = n * args.batch / (time.perf_counter() - tic)
        print(f"{workers:>7} {rate:>10.1f} {rate / max(1, workers):>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

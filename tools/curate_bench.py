#!/usr/bin/env python
"""Speed of mmscale-curate's two CPU parts, for docs/DATA.md: hashing (content hash + decode +
pHash) in images per CPU-second (one core's rate, measured in process time so that other work on
the machine does not count), and the near-duplicate search over N 64-bit hashes with
multi-index hashing against comparing every pair (timed on a sample of rows and scaled: its cost
is exactly linear in the rows), with the pairs of those rows checked equal. All times are CPU
time of this one process.

    python tools/curate_bench.py --images ../shared/data/coco-mini --hashes 1000000 --radius 2 4 6
"""
import argparse
import glob
import io
import os
import platform
import time

import numpy as np
from PIL import Image


def hashing(files: list[str], seconds: float) -> None:
    """Images per CPU-second of mmscale-curate's hashing (content hash, decode, pHash), for the
    originals and for 256-px re-encodes (what mmscale-build-shards stores)."""
    from mmscale.data.curate.hashing import image_hashes
    originals = [open(f, "rb").read() for f in files]
    small = []
    for data in originals:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        image.thumbnail((256, 256))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=95)
        small.append(out.getvalue())
    for name, images in (("COCO-MINI originals (640 px)", originals), ("256 px re-encodes", small)):
        n, tic = 0, time.process_time()  # CPU time: one core's work, whatever else the machine runs
        while time.process_time() - tic < seconds:
            for data in images:
                image_hashes(data)
            n += len(images)
        print(f"hashing, {name}: {n / (time.process_time() - tic):.0f} images per CPU-second ({n} images)")


def _recode(data: bytes, scale: float = 1.0, crop: float = 0.0, fmt: str = "JPEG") -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    image = image.crop((round(w * crop), round(h * crop), round(w * (1 - crop)), round(h * (1 - crop))))
    image = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))), Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 70} if fmt == "JPEG" else {}))
    return out.getvalue()


def distances(files: list[str], others: list[str]) -> None:
    """How far (in pHash bits) copies land from their original, and how near distinct images come:
    what --near-dup-radius trades."""
    from mmscale.data.curate.hashing import image_hashes
    from mmscale.data.curate.neardup import brute_force_pairs
    originals = [open(f, "rb").read() for f in files]
    hashes = np.array([image_hashes(d)[1] for d in originals], dtype=np.uint64)
    for name, kwargs in (("half size, JPEG q70", {"scale": 0.5}), ("0.3 size, JPEG q70", {"scale": 0.3}),
                         ("same size, PNG", {"fmt": "PNG"}), ("5% cropped off each side", {"crop": 0.05})):
        d = [bin(int(h) ^ image_hashes(_recode(data, **kwargs))[1]).count("1") for data, h in zip(originals, hashes)]
        print(f"pHash distance of a copy to its original, {name}: median {np.median(d):.0f}, max {max(d)} "
              f"({len(d)} images)")
    every = np.concatenate([hashes, [image_hashes(open(f, "rb").read())[1] for f in others]]).astype(np.uint64)
    pairs = brute_force_pairs(every, 10)
    counts = np.bincount(np.bitwise_count(every[pairs[:, 0]] ^ every[pairs[:, 1]]), minlength=11)
    print(f"pairs of distinct images within 10 bits among {len(every)} ({len(files)} photos + {len(others)} CIFAR-10 "
          f"test images): " + ", ".join(f"{d}: {c}" for d, c in enumerate(counts) if c))


def search(n: int, radii: list[int], sample: int, seed: int = 0) -> None:
    from mmscale.data.curate.neardup import brute_force_pairs, greedy_keep, near_pairs, pieces
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2 ** 64, n, dtype=np.uint64, endpoint=False)
    # a tenth are near copies of other rows: 0 to 4 bits flipped (the same bit twice flips back)
    copies, sources = rng.choice(n, n // 10, replace=False), rng.integers(0, n, n // 10)
    flips = np.zeros(len(copies), dtype=np.uint64)
    for k in range(4):
        flip = rng.integers(0, 5, len(copies)) > k  # drawn in this order: the numbers in docs/DATA.md
        bit = np.uint64(1) << rng.integers(0, 64, len(copies)).astype(np.uint64)
        flips ^= np.where(flip, bit, np.uint64(0))
    hashes[copies] = hashes[sources] ^ flips
    queries = rng.choice(n, sample, replace=False)
    for r in radii:
        tic = time.process_time()
        pairs = near_pairs(hashes, r)
        t_mih = time.process_time() - tic
        exact = ""
        if r + 1 != pieces(n, r) and r <= 4:  # the plain scheme: r + 1 substrings, each looked up as it is
            tic = time.process_time()
            near_pairs(hashes, r, m=r + 1)
            exact = f" ({pieces(n, r)} substrings; {r + 1} exact ones: {time.process_time() - tic:.1f} s)"
        tic = time.process_time()
        greedy_keep(hashes, np.arange(n), r)
        t_keep = time.process_time() - tic
        tic = time.process_time()
        brute = brute_force_pairs(hashes[queries], r, hashes)
        t_brute = time.process_time() - tic
        brute = brute[queries[brute[:, 0]] != brute[:, 1]]  # not itself
        # the same pairs: those of near_pairs that touch a sampled row
        mine = np.concatenate([pairs[np.isin(pairs[:, 0], queries)], pairs[np.isin(pairs[:, 1], queries)][:, ::-1]])
        got = {(int(a), int(b)) for a, b in mine}
        want = {(int(queries[q]), int(j)) for q, j in brute}
        assert got == want, f"radius {r}: multi-index hashing and brute force disagree"
        scaled = t_brute * (n / 2) / sample  # every pair once: n (n - 1) / 2 comparisons
        print(f"near duplicates at {n:,} hashes, radius {r}: multi-index hashing {t_mih:.1f} s ({len(pairs):,} pairs)"
              f"{exact}, "
              f"greedy keep {t_keep:.1f} s; brute force {t_brute:.1f} s for {sample:,} rows x {n:,} -> "
              f"{scaled:,.0f} s for all pairs ({scaled / t_mih:,.0f}x); same pairs for the sampled rows")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="../shared/data/coco-mini", help="a folder of JPEGs (searched recursively)")
    p.add_argument("--cifar", default="../shared/data/cifar10", help="CIFAR-10 class folders: distinct small images")
    p.add_argument("--cifar-images", type=int, default=5000, help="CIFAR-10 test images in the distances (default 5000)")
    p.add_argument("--seconds", type=float, default=10, help="time per hashing measurement (default 10)")
    p.add_argument("--hashes", type=int, default=1_000_000, help="hashes in the search (default 1000000; 0: no search)")
    p.add_argument("--radius", type=int, nargs="+", default=[2, 4, 6], help="Hamming radii (default 2 4 6)")
    p.add_argument("--sample", type=int, default=2000, help="rows brute force is timed on (default 2000)")
    a = p.parse_args(argv)
    import imagehash
    import PIL
    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), cpu)
    print(f"{cpu}, {os.cpu_count()} cores; numpy {np.__version__}, "
          f"Pillow {PIL.__version__}, imagehash {imagehash.__version__}")
    files = sorted(glob.glob(os.path.join(a.images, "**", "*.jpg"), recursive=True))
    if files:
        hashing(files, a.seconds)
        others = sorted(glob.glob(os.path.join(a.cifar, "test", "*", "*.jpg")))[:a.cifar_images]
        distances(files, others)
    if a.hashes:
        search(a.hashes, a.radius, a.sample)


if __name__ == "__main__":
    main()

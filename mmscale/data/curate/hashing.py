"""What curation knows of a sample without a model: its image's content hash (exact duplicates),
its perceptual hash (near duplicates, decontamination), its size, and a key of its normalised
caption; read from shards front to back, or from an evaluation set's images."""
from __future__ import annotations

import hashlib
import io
import re
import unicodedata

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def phash64(image: Image.Image) -> int:
    """imagehash's pHash (the DCT's 8 x 8 lowest frequencies of a 32 x 32 grey copy, against their
    median) as a 64-bit integer, row-major, most significant bit first; decodes the image (OSError
    if it cannot). The image is decoded in full: libjpeg's scaled decoding (Image.draft) is faster
    on large JPEGs, but copies of one photo at different sizes then go through different decoding
    paths and land further apart (up to 4 bits instead of 2 on COCO-MINI)."""
    import imagehash
    bits = imagehash.phash(image).hash.ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def image_hashes(data: bytes) -> tuple[str, int, int]:
    """(content hash, pHash, pixels) of an encoded image; OSError / ValueError when it does not
    decode. The content hash is BLAKE2b-128 of the bytes: identical files, whatever their name."""
    image = Image.open(io.BytesIO(data))
    pixels = image.width * image.height
    return hashlib.blake2b(data, digest_size=16).hexdigest(), phash64(image), pixels


def caption_key(text: str) -> int:
    """A 64-bit key of the caption with case, accents' forms, punctuation and spacing taken out:
    captions that differ only in those share it."""
    words = re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold())
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest(), "big")


def image_member(sample: dict) -> str | None:
    return next((e for e in IMAGE_EXTS if e in sample), None)


def shard_samples(url: str, errors: list):
    """(offset, sample) of a tar shard front to back, webdataset's grouping of members into samples
    ({"__key__", ext: bytes}); a tar that breaks ends early, with why appended to `errors`."""
    from webdataset.tariterators import tarfile_samples

    def stop(e):
        errors.append(e)
        return False

    yield from enumerate(tarfile_samples([{"url": url}], handler=stop))


def hash_shard(url: str) -> tuple[dict, str | None]:
    """Columns (lists) of one shard's samples: offset, key, content, phash, pixels, caption, error
    (empty: it decodes); and why the tar ended early, if it did."""
    cols = {k: [] for k in ("offset", "key", "content", "phash", "pixels", "caption", "error")}
    broken: list = []
    for offset, sample in shard_samples(url, broken):
        content, phash, pixels, error = "", 0, 0, ""
        ext = image_member(sample)
        try:
            if ext is None:
                raise ValueError(f"no image member ({', '.join(IMAGE_EXTS)})")
            content, phash, pixels = image_hashes(sample[ext])
        except (OSError, ValueError, SyntaxError) as e:  # PIL: OSError subclasses; SyntaxError for some PNGs
            error = f"{type(e).__name__}: {e}"[:200]
        text = sample.get("txt", b"").decode("utf-8", "replace").strip()
        for k, v in zip(cols, (offset, sample["__key__"], content, phash, pixels, caption_key(text), error)):
            cols[k].append(v)
    return cols, (f"{type(broken[0]).__name__}: {broken[0]}" if broken else None)


def hash_image_source(item) -> int | None:
    """The pHash of an evaluation image: a file path or a PIL image (CIFAR pickles); None if it
    does not decode (it then cannot be matched either)."""
    try:
        return phash64(item if isinstance(item, Image.Image) else Image.open(item))
    except (OSError, ValueError, SyntaxError):
        return None


def as_uint64(values) -> np.ndarray:
    return np.asarray([int(v) for v in values], dtype=np.uint64)

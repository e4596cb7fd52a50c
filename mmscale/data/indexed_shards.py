"""Training-time reading of tar shards by index: the shard index (`_meta/shards.json`, wids'
format) and `ShardDataset`, which reads any sample of a set of shards by its global index.

Reading by index is what makes resume exact (the sample order is BatchStream's permutation). Each
shard is checked against its file at start-up (data.on_bad_shard); a shard whose images do not
decode is dropped with one line when first met, each draw of it replaced (KeyedDataset).
"""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile

from PIL import Image

from ..config import ConfigError
from ..dist import rank_and_world
from ..files import atomic_write_json
from .images import KeyedDataset, brief_error, stable_id

META = "_meta"


def write_index(out_dir: str, shardlist: list[dict]) -> str:
    """wids-style shard index; urls are relative to the shards folder."""
    path = os.path.join(out_dir, META, "shards.json")
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": os.path.basename(os.path.abspath(out_dir)),
             "shardlist": shardlist}
    atomic_write_json(path, index, indent=1)
    return path


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


def _sample_key(member: str) -> str:
    """The sample a tar member belongs to, as webdataset groups them: the path up to the first dot
    of its file name (00000001.png and 00000001.txt are one sample)."""
    folder, _, name = member.rpartition("/")
    return f"{folder}/{name.split('.', 1)[0]}"


def shard_problem(url: str, nsamples: int) -> str | None:
    """What is wrong with one shard file against its index entry, without decoding anything:
    missing, unreadable, not a tar, or fewer samples than the index says (from the tar headers,
    and every member's data inside the file); None if it is whole."""
    if not os.path.exists(url):
        return "missing"
    try:
        size = os.path.getsize(url)
        if size == 0:
            return "empty (0 bytes)"
        keys, end = [], 0
        with tarfile.open(url, "r:") as tar:
            for m in tar:
                if m.isfile():
                    if not keys or keys[-1] != _sample_key(m.name):
                        keys.append(_sample_key(m.name))
                    end = max(end, m.offset_data + m.size)
    except tarfile.ReadError as e:
        return f"not a tar ({e})" if not keys else f"unreadable after {len(keys)} samples ({e})"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if end > size:  # the last member's data runs past the end: truncated
        return f"truncated ({size} bytes, its members need {end})"
    if len(keys) < nsamples:
        return f"{len(keys)} samples, the index says {nsamples}"
    return None


_checked: dict = {}  # (folder, index mtime, shard sizes) -> readable shardlist: one check per process


def readable_shards(folder: str, on_bad: str = "drop") -> list[dict]:
    """The shard index of `folder`, each shard checked against its file (shard_problem). A bad shard
    is dropped with one line naming it and the samples lost (rank 0 prints), or with on_bad
    "error" the run stops with that line (ConfigError). Every rank reaches the same verdict on
    the same files, so the epoch is planned over the same readable shards everywhere."""
    shards = read_index(folder)
    stamp = []
    for s in shards:
        try:
            st = os.stat(s["url"])
            stamp.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stamp.append(None)
    key = (os.path.abspath(folder), os.path.getmtime(os.path.join(folder, META, "shards.json")), tuple(stamp), on_bad)
    if key in _checked:
        return _checked[key]
    bad = [(s, p) for s in shards if (p := shard_problem(s["url"], s["nsamples"]))]
    lines = [f"data.shards: {os.path.relpath(s['url'], folder)} is {p}: its {s['nsamples']} samples are lost"
             for s, p in bad]
    good = [s for s in shards if all(s is not b for b, _ in bad)]
    if bad and on_bad == "error":
        raise ConfigError("; ".join(lines) + " (data.on_bad_shard=drop trains on the other shards)")
    if not good:
        raise ConfigError(f"data.shards: no readable shard in {folder}: " + "; ".join(lines))
    if bad and rank_and_world()[0] == 0:
        kept = sum(s["nsamples"] for s in good)
        for line in lines:
            print(f"mmscale: {line}; training on {kept} samples in {len(good)} shards", file=sys.stderr, flush=True)
    _checked[key] = good
    return good


class ShardReadError(OSError):
    """A shard that was whole at start-up could not be read (truncated, removed, an I/O error), or
    one whose images do not decode; `reported`: its one line was printed, no warning per sample."""

    def __init__(self, message: str, reported: bool = False):
        super().__init__(message)
        self.reported = reported


UNDECODABLE_PROBES = 16  # samples spread over a shard tried before it is dropped as undecodable


def _worker_zero() -> bool:
    """Rank 0's first loader worker (or its main process): who prints a dropped shard's line."""
    from torch.utils.data import get_worker_info
    info = get_worker_info()
    return rank_and_world()[0] == 0 and (info is None or info.id == 0)


class ShardDataset(KeyedDataset):
    """Random access into the tar shards of tools/build_shards.py through webdataset's wids
    index, so the exact, resumable BatchStream works on shards as on folders.

    Only the shards found whole at start-up are indexed (readable_shards). A shard that breaks
    later (a read error) is marked broken in this process; one whose images do not decode is
    dropped with one line (_drops: a verdict of the file alone, the same in every process and
    resumed run). Each draw of their samples is replaced (KeyedDataset) and counted as skipped."""

    def __init__(self, folder: str | list[str], transform, on_bad_shard: str = "drop"):
        """folder: one build_shards folder, or several (data.sources) laid end to end in that order;
        source_sizes holds each one's readable samples."""
        super().__init__(transform)
        self.shardlist, self.source_sizes = [], []
        for f in [folder] if isinstance(folder, str) else folder:
            shards = readable_shards(f, on_bad_shard)
            self.shardlist += shards
            self.source_sizes.append(sum(s["nsamples"] for s in shards))
        self.size = sum(s["nsamples"] for s in self.shardlist)
        self.starts = [0]
        for s in self.shardlist:
            self.starts.append(self.starts[-1] + s["nsamples"])
        self.broken: set[int] = set()  # shard numbers that failed a read in this process
        self.undecodable: dict[int, str | None] = {}  # shard number -> why it is dropped (None: it decodes)
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

    def _shard(self, i: int) -> int:
        import bisect
        return bisect.bisect_right(self.starts, i) - 1

    def _read(self, i: int) -> dict:
        k = self._shard(i)
        if k in self.broken:
            raise ShardReadError(f"shard {self.shardlist[k]['url']} broke earlier in this run", reported=True)
        if self.undecodable.get(k):
            raise ShardReadError(self.undecodable[k], reported=True)
        try:
            return self._dataset()[i]
        except Exception as e:  # wids: IndexError past a truncated end, tarfile/OS errors
            self.broken.add(k)
            self._ds = None  # reopen: wids may hold a handle on the broken file
            raise ShardReadError(f"shard {self.shardlist[k]['url']} became unreadable "
                                 f"({type(e).__name__}: {e}); its samples are skipped") from None

    @staticmethod
    def _decode(sample: dict) -> tuple:
        image_key = next((k for k in (".jpg", ".jpeg", ".png", ".webp") if k in sample), None)
        if image_key is None or ".txt" not in sample:
            raise ValueError(f"{sample.get('__key__')} has no image or no .txt")
        data = sample[image_key].read()  # the bytes identify the image (loss.positives: image)
        image = Image.open(io.BytesIO(data))
        image.load()
        return image, sample[".txt"].read().decode("utf-8").strip(), ShardDataset._label(sample), stable_id(data)

    def load(self, i):
        sample = self._read(i)
        try:
            return self._decode(sample)
        except (OSError, ValueError):
            if self._drops(self._shard(i)):
                raise ShardReadError(self.undecodable[self._shard(i)], reported=True) from None
            raise

    def _drops(self, k: int) -> bool:
        """Whether shard k, one of whose samples did not decode, is dropped: none of the samples
        spread over it decodes either (decided once per process, so once per epoch in workers)."""
        if k not in self.undecodable:
            n, errors = self.shardlist[k]["nsamples"], []
            for off in sorted({p * (n - 1) // (UNDECODABLE_PROBES - 1) for p in range(UNDECODABLE_PROBES)}):
                try:
                    self._decode(self._read(self.starts[k] + off))
                    break
                except (OSError, ValueError) as e:
                    errors.append(e)
            else:
                url = self.shardlist[k]["url"]  # named with its folder: data.sources has several
                self.undecodable[k] = (
                    f"data.shards: {os.path.join(os.path.basename(os.path.dirname(url)), os.path.basename(url))} does "
                    f"not decode (none of {len(errors)} samples spread over it does: {brief_error(errors[0])}): "
                    f"dropped for the epoch, its {n} samples are lost (each draw of one is replaced by another sample "
                    f"and counted in skipped_samples)")
                if _worker_zero():
                    print(f"mmscale: {self.undecodable[k]}", file=sys.stderr, flush=True)
            self.undecodable.setdefault(k, None)
        return self.undecodable[k] is not None

    def label(self, i) -> int:
        return self._label(self._read(i))  # reads the tar members, decodes no image

    @staticmethod
    def _label(sample: dict) -> int:
        """The class of a classification shard: a .cls member, or "label" in img2dataset's .json."""
        if ".cls" in sample:
            return int(sample[".cls"].read().decode().strip())
        if ".json" in sample:
            return int(json.loads(sample[".json"].read()).get("label", -1))
        return -1

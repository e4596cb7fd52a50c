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

import contextlib
import glob
import io
import json
import os
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass

from PIL import Image

from ..config import ConfigError
from ..dist import rank_and_world
from ..files import atomic_path, atomic_write_json
from .images import KeyedDataset, brief_error, stable_id

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


def write_index(out_dir: str, shardlist: list[dict]) -> str:
    """wids-style shard index; urls are relative to the shards folder."""
    path = os.path.join(out_dir, META, "shards.json")
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": os.path.basename(os.path.abspath(out_dir)),
             "shardlist": shardlist}
    atomic_write_json(path, index, indent=1)
    return path


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

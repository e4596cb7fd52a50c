"""The curation pass over a shard set, resumable and split over ranks.

1. Every input shard is read once for its hashes (hashing.py), and again for its CLIP scores when
   a model is given (scoring.py); each shard's result is a parquet file in OUT/_meta/curate/,
   written atomically and stamped with the input file's size and mtime (and the model), so a rerun
   does only the shards without an up-to-date file. Rank r of W (torchrun) takes shards r, r + W,
   ...; each rank spreads its shards over --workers processes.
2. Rank 0 reads them all, hashes the evaluation sets, and plans the verdicts (plan.py): every
   input sample with its verdict, kept duplicate and score goes to OUT/_meta/curation.parquet.
3. The kept samples, in input order and with every tar member's bytes unchanged, are cut into
   output shards of --shard-size (rank r writes shards r, r + W, ...), each written atomically: a
   rerun of the same plan writes only the missing ones (another plan starts them afresh).
4. Rank 0 writes the index (indexed_shards.write_index, what `data.type: shards` reads) and
   OUT/_meta/summary.json (kept and dropped counts by reason) last: a folder with an index is done.
"""
from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from ...dist import barrier, broadcast_object, rank_and_world
from ...files import atomic_path, atomic_write_json
from ..indexed_shards import META, read_index, write_index
from .hashing import as_uint64, hash_image_source, hash_shard, shard_samples
from .plan import KEPT, PlanOptions, counts, plan
from .scoring import Scorer, score_shards

WORK = os.path.join(META, "curate")


class CurateError(ValueError):
    """A problem the user fixes (bad folder, unreadable model, empty result): one line, exit 2."""


@dataclass
class CurateOptions(PlanOptions):
    shard_size: int = 10000
    workers: int = 1
    batch_size: int = 256


@dataclass
class EvalSet:
    """An evaluation set to decontaminate against: its images (file paths or PIL images) or the tar
    files of a shard set."""
    name: str
    path: str
    images: list = field(default_factory=list)
    tars: list = field(default_factory=list)


def input_shards(folder: str) -> list[dict]:
    """[{url, nsamples (-1: unknown)}] of a shard folder: its index, else its *.tar files."""
    if not os.path.isdir(folder):
        raise CurateError(f"{folder}: not a folder (give a shard folder written by mmscale-build-shards)")
    if os.path.isfile(os.path.join(folder, META, "shards.json")):
        shards = read_index(folder)
        missing = [s["url"] for s in shards if not os.path.isfile(s["url"])]
        if missing:
            raise CurateError(f"{missing[0]}: listed in {folder}/{META}/shards.json but missing ({len(missing)} missing)")
    else:
        shards = [{"url": u, "nsamples": -1} for u in sorted(glob.glob(os.path.join(folder, "*.tar")))]
    if not shards:
        raise CurateError(f"{folder}: no shard index ({META}/shards.json) and no .tar files")
    return shards


def _stamp(path: str) -> str:
    """What a work file derived from `path` is valid for: that file, at that size and time."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def _write_table(path: str, columns: dict, meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table(columns).replace_schema_metadata({"mmscale": json.dumps(meta)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _table_meta(path: str) -> dict | None:
    import pyarrow.parquet as pq
    try:
        return json.loads(pq.read_schema(path).metadata[b"mmscale"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _hash_one(task: tuple) -> int:
    url, out, stamp = task
    cols, broken = hash_shard(url)
    cols["phash"] = as_uint64(cols["phash"])
    cols["caption"] = as_uint64(cols["caption"])
    _write_table(out, cols, {"stamp": stamp, "broken": broken})
    return len(cols["offset"])


def _progress(what: str, done: int, total: int, items: int, tic: float) -> None:
    print(f"curate: {what} {done}/{total} shards on rank {rank_and_world()[0]} "
          f"({items / max(time.perf_counter() - tic, 1e-9):.0f} samples/s)", file=sys.stderr, flush=True)


def _pool(workers: int):
    # fork: the workers inherit the imports; spawn would re-import torch in each
    return multiprocessing.get_context("fork").Pool(workers)


def hash_inputs(shards: list[dict], work: str, mine: list[int], workers: int) -> None:
    tasks = []
    for k in mine:
        out, stamp = os.path.join(work, "hashes", f"{k:06d}.parquet"), _stamp(shards[k]["url"])
        if (_table_meta(out) or {}).get("stamp") != stamp:
            tasks.append((shards[k]["url"], out, stamp))
    tic, items = time.perf_counter(), 0
    with _pool(max(1, workers)) as pool:
        for done, n in enumerate(pool.imap_unordered(_hash_one, tasks), 1):
            items += n
            _progress("hashed", done, len(tasks), items, tic)


def score_inputs(shards: list[dict], work: str, mine: list[int], scorer: Scorer, batch_size: int, workers: int) -> None:
    todo = []
    for k in mine:
        meta = {"stamp": _stamp(shards[k]["url"]), "model": scorer.name}
        out = os.path.join(work, "scores", f"{k:06d}.parquet")
        if _table_meta(out) != meta:
            todo.append((k, shards[k]["url"]))

    def write(k: int, offsets: list, scores: list) -> None:
        _write_table(os.path.join(work, "scores", f"{k:06d}.parquet"),
                     {"offset": offsets, "score": scores}, {"stamp": _stamp(shards[k]["url"]), "model": scorer.name})
    score_shards(scorer, todo, write, batch_size, workers)


def load_table(shards: list[dict], work: str, scored: bool) -> tuple[pd.DataFrame, int]:
    """Every sample's hashes (and score) in input order; and the samples the index lists that
    could not be read (tars that end early)."""
    parts, unreadable = [], 0
    for k, s in enumerate(shards):
        path = os.path.join(work, "hashes", f"{k:06d}.parquet")
        part = pd.read_parquet(path)
        part.insert(0, "shard", k)
        if scored:
            score = pd.read_parquet(os.path.join(work, "scores", f"{k:06d}.parquet"))
            part = part.merge(score, on="offset", how="left")
        else:
            part["score"] = np.nan
        unreadable += max(0, s["nsamples"] - len(part))
        parts.append(part)
    return pd.concat(parts, ignore_index=True), unreadable


def _hash_eval(item) -> int | None:
    return hash_image_source(item)


def hash_eval_set(ev: EvalSet, work: str, workers: int) -> np.ndarray:
    """The pHashes of an evaluation set's images (those that decode), cached per (path, size)."""
    stamp = f"{os.path.abspath(ev.path)}|{len(ev.images)}|{[_stamp(t) for t in ev.tars]}"
    path = os.path.join(work, "eval", f"{ev.name}.parquet")
    if (_table_meta(path) or {}).get("stamp") == stamp:
        return pd.read_parquet(path)["phash"].to_numpy(dtype=np.uint64)
    if ev.tars:
        with _pool(max(1, workers)) as pool:
            cols = [c for c, _ in pool.map(hash_shard, ev.tars)]
        hashes = [h for c in cols for h, e in zip(c["phash"], c["error"]) if not e]
    else:
        with _pool(max(1, workers)) as pool:
            hashes = [h for h in pool.map(_hash_eval, ev.images, chunksize=64) if h is not None]
    if not hashes:
        raise CurateError(f"--decontaminate {ev.name}={ev.path}: none of its images decodes")
    _write_table(path, {"phash": as_uint64(hashes)}, {"stamp": stamp})
    return as_uint64(hashes)


def _fingerprint(kept: pd.DataFrame, shard_size: int, stamps: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{shard_size}|{stamps}".encode())
    h.update(kept[["shard", "offset"]].to_numpy(dtype=np.int64).tobytes())
    return h.hexdigest()


def write_outputs(shards: list[dict], out_dir: str, plan_path: str, mine, workers: int) -> None:
    kept = pd.read_parquet(plan_path)
    tasks = [(os.path.join(out_dir, f"{j:05d}.tar"), [(shards[k]["url"], dict(zip(g["offset"], g["out_key"])))
                                                       for k, g in part.groupby("shard", sort=True)])
             for j, part in kept.groupby("out_shard", sort=True) if j in mine]
    tasks = [t for t in tasks if not os.path.isfile(t[0])]
    tic, items = time.perf_counter(), 0
    with _pool(max(1, workers)) as pool:
        for done, n in enumerate(pool.imap_unordered(_write_one, tasks), 1):
            items += n
            _progress("wrote", done, len(tasks), items, tic)


def _write_one(task: tuple) -> int:
    """One output shard: the listed samples of each input shard, every member as it was."""
    import webdataset as wds
    path, sources = task
    n = 0
    with atomic_path(path) as tmp:
        with wds.TarWriter(tmp) as sink:
            for url, keys in sources:  # {offset: the sample's key in the output}
                errors, before = [], n
                for offset, sample in shard_samples(url, errors):
                    if offset in keys:
                        members = {k: v for k, v in sample.items() if not k.startswith("__")}
                        sink.write({"__key__": keys[offset], **members})
                        n += 1
                if errors or n - before < len(keys):
                    raise CurateError(f"{url}: changed while curating ({errors[0] if errors else 'samples missing'}); "
                                      f"rerun")
    return n


def curate(in_dir: str, out_dir: str, opts: CurateOptions, eval_sets: list[EvalSet] = (),
           scorer: Scorer | None = None) -> dict:
    """Curates the shard set in_dir into out_dir (module docstring); returns the summary."""
    if os.path.abspath(out_dir) == os.path.abspath(in_dir):
        raise CurateError(f"{out_dir}: the output folder must not be the input folder")
    shards = input_shards(in_dir)
    rank, world = rank_and_world()
    work = os.path.join(out_dir, WORK)
    if glob.glob(os.path.join(out_dir, "*.tar")) and not os.path.isfile(os.path.join(work, "plan.json")):
        raise CurateError(f"{out_dir}: holds .tar files that mmscale-curate did not write; give a new or empty folder")
    barrier()  # every rank has looked before rank 0 tidies
    if rank == 0:  # what a killed run left half-written (atomic_path's temporaries)
        for folder in (out_dir, os.path.join(out_dir, META), work, os.path.join(work, "*")):
            for tmp in glob.glob(os.path.join(folder, "*.tmp*")):
                os.remove(tmp)
    barrier()
    tic = time.perf_counter()
    mine = list(range(rank, len(shards), world))
    hash_inputs(shards, work, mine, opts.workers)
    if scorer is not None:
        score_inputs(shards, work, mine, scorer, opts.batch_size, opts.workers)
    barrier()
    plan_path = os.path.join(work, "plan.parquet")
    summary, error = None, None
    if rank == 0:
        try:
            summary = _plan(shards, in_dir, out_dir, work, plan_path, opts, eval_sets, scorer)
        except CurateError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise CurateError(error)
    n_out = broadcast_object(summary["shards"] if summary else 0)
    write_outputs(shards, out_dir, plan_path, set(range(rank, n_out, world)), opts.workers)
    barrier()
    if rank == 0:
        kept = pd.read_parquet(plan_path)
        sizes = kept.groupby("out_shard").size()
        write_index(out_dir, [{"url": f"{j:05d}.tar", "nsamples": int(sizes[j])} for j in range(n_out)])
        summary["seconds"] = round(time.perf_counter() - tic, 1)
        atomic_write_json(os.path.join(out_dir, META, "summary.json"), summary, indent=1)
    barrier()
    return summary


def _plan(shards, in_dir, out_dir, work, plan_path, opts: CurateOptions, eval_sets, scorer) -> dict:
    """Rank 0: the verdicts, curation.parquet, the output shards' contents; the summary so far."""
    table, unreadable = load_table(shards, work, scorer is not None)
    evals = {ev.name: hash_eval_set(ev, work, opts.workers) for ev in eval_sets}
    verdicts, clip = plan(table, evals, opts)
    rel = [os.path.relpath(s["url"], in_dir) for s in shards]
    keys = table["key"].to_numpy()
    dup = verdicts["duplicate_of"].to_numpy()
    _write_table(os.path.join(out_dir, META, "curation.parquet"), {
        "key": table["key"].tolist(), "shard": [rel[k] for k in table["shard"]], "offset": table["offset"].tolist(),
        "verdict": verdicts["verdict"].tolist(), "duplicate_of": [keys[d] if d >= 0 else "" for d in dup],
        "clip_score": table["score"].tolist(), "error": table["error"].tolist()}, {})
    summary = {"input": os.path.abspath(in_dir), "input_shards": len(shards), "samples": len(table) + unreadable,
               **counts(verdicts["verdict"])}
    if unreadable:
        summary["dropped"]["unreadable"] = unreadable  # listed by the index, in no readable tar
    if not summary["kept"]:
        raise CurateError(f"nothing is kept: every one of the {summary['samples']} samples was dropped "
                          f"({json.dumps(summary['dropped'])}); loosen the options")
    kept = table.loc[verdicts["verdict"].to_numpy() == KEPT, ["shard", "offset", "key"]].reset_index(drop=True)
    kept["out_shard"] = np.arange(len(kept)) // opts.shard_size
    # keys must stay unique in the output (webdataset groups a tar's members by key): tars made
    # elsewhere may number each shard's samples from 0, and then every key gets its shard's number
    renamed = not kept["key"].is_unique
    kept["out_key"] = [f"{k:06d}_{key}" for k, key in zip(kept["shard"], kept["key"])] if renamed else kept["key"]
    kept = kept.drop(columns="key")
    fingerprint = _fingerprint(kept, opts.shard_size, [_stamp(s["url"]) for s in shards])
    record = os.path.join(work, "plan.json")
    previous = json.load(open(record)).get("fingerprint") if os.path.isfile(record) else None
    if previous != fingerprint:  # another plan: the shards written for the old one are not this one's
        for stale in glob.glob(os.path.join(out_dir, "*.tar")) + [os.path.join(out_dir, META, "shards.json")]:
            if os.path.exists(stale):
                os.remove(stale)
        _write_table(plan_path, {c: kept[c].to_numpy() for c in kept.columns}, {})
        atomic_write_json(record, {"fingerprint": fingerprint}, indent=None)
    options = {k: v for k, v in asdict(opts).items() if k not in ("workers", "batch_size")}
    return {**summary, "options": options, "eval_sets": {ev.name: ev.path for ev in eval_sets},
            "clip": {"model": scorer.name, **clip} if scorer else None, "keys_renamed": renamed,
            "shards": int(kept["out_shard"].max()) + 1,
            "shard_index": f"{META}/shards.json", "samples_file": f"{META}/curation.parquet"}

"""Which samples a curation keeps: one verdict per sample, from its hashes and CLIP score.

The filters run in this order, each on what the ones before left: undecodable images; images
within the decontamination radius of an evaluation image (per set, in the order given); exact
duplicates (identical image bytes); near duplicates (pHash within --near-dup-radius); optionally
duplicate captions; then the CLIP score. Of each group of duplicates the sample kept is the one
with the most pixels, then the first in input order (img2dataset's shards store every image at
one size, so in practice the first); every dropped duplicate names the kept one (`duplicate_of`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .neardup import greedy_keep, near_pairs

KEPT = "kept"


@dataclass
class PlanOptions:
    near_dup_radius: int = 4  # -1: no near-duplicate search
    decontaminate_radius: int = 4
    dedup_captions: bool = False
    clip_threshold: float | None = None
    clip_keep_fraction: float | None = None


def _first_of_groups(values: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """For each row, -1 if it is the best (in `priority` order) of the rows sharing its value,
    else the index of that best row."""
    ordered = values[priority]
    _, first, inverse = np.unique(ordered, return_index=True, return_inverse=True)
    best = priority[first][inverse]  # the group's best row, for each row in priority order
    out = np.full(len(values), -1, dtype=np.int64)
    dup = best != priority
    out[priority[dup]] = best[dup]
    return out


def plan(table: pd.DataFrame, eval_sets: dict[str, np.ndarray], opts: PlanOptions) -> tuple[pd.DataFrame, dict]:
    """table: one row per sample in input order (columns error, content, phash, pixels, caption,
    score). Returns (verdict and duplicate_of (a row number or -1) per row, what the CLIP filter
    used: {"threshold", "keep_fraction", "effective_threshold", "scored"})."""
    n = len(table)
    verdict = np.full(n, KEPT, dtype=object)
    dup_of = np.full(n, -1, dtype=np.int64)
    alive = (table["error"] == "").to_numpy()
    verdict[~alive] = "undecodable"
    phash = table["phash"].to_numpy(dtype=np.uint64)
    for name, hashes in eval_sets.items():  # every training image near any evaluation image
        rows = np.flatnonzero(alive)
        hit = rows[np.unique(near_pairs(phash[rows], opts.decontaminate_radius, hashes)[:, 0])]
        verdict[hit], alive[hit] = f"contaminated:{name}", False

    def drop_duplicates(reason: str, find) -> None:
        rows = np.flatnonzero(alive)
        # most pixels first, then input order
        priority = np.lexsort((rows, -table["pixels"].to_numpy()[rows]))
        cover = find(rows, priority)
        dropped = cover >= 0
        verdict[rows[dropped]], dup_of[rows[dropped]] = reason, rows[cover[dropped]]
        alive[rows[dropped]] = False

    drop_duplicates("exact_duplicate", lambda rows, prio: _first_of_groups(table["content"].to_numpy()[rows], prio))
    if opts.near_dup_radius >= 0:
        drop_duplicates("near_duplicate", lambda rows, prio: greedy_keep(phash[rows], prio, opts.near_dup_radius))
    if opts.dedup_captions:
        captions = table["caption"].to_numpy(dtype=np.uint64)
        drop_duplicates("duplicate_caption", lambda rows, prio: _first_of_groups(captions[rows], prio))
    clip = {}
    if opts.clip_threshold is not None or opts.clip_keep_fraction is not None:
        rows = np.flatnonzero(alive)
        scores = table["score"].to_numpy(dtype=np.float64)[rows]
        unscored = np.isnan(scores)  # decoded for hashing but not for the model's transform
        verdict[rows[unscored]], alive[rows[unscored]] = "undecodable", False
        rows, scores = rows[~unscored], scores[~unscored]
        if opts.clip_threshold is not None:
            low = scores < opts.clip_threshold
        else:  # the top fraction of what reaches this filter, ties broken by input order
            k = int(round(opts.clip_keep_fraction * len(rows)))
            low = np.ones(len(rows), dtype=bool)
            low[np.lexsort((rows, -scores))[:k]] = False
        verdict[rows[low]], alive[rows[low]] = "clip_score", False
        clip = {"threshold": opts.clip_threshold, "keep_fraction": opts.clip_keep_fraction, "scored": len(rows),
                "effective_threshold": float(scores[~low].min()) if (~low).any() else None}
    return pd.DataFrame({"verdict": verdict, "duplicate_of": dup_of}), clip


def counts(verdicts: pd.Series) -> dict:
    """{"kept": n, "dropped": {reason: n, "contaminated": {set: n}}} of a plan's verdicts."""
    dropped: dict = {}
    for reason, n in verdicts[verdicts != KEPT].value_counts().sort_index().items():
        kind, _, name = reason.partition(":")
        if name:
            dropped.setdefault(kind, {})[name] = int(n)
        else:
            dropped[kind] = int(n)
    return {"kept": int((verdicts == KEPT).sum()), "dropped": dropped}

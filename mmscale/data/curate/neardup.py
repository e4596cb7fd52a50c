"""Pairs of 64-bit perceptual hashes within a Hamming radius r, found with multi-index hashing
instead of comparing all pairs, and the greedy choice of which near duplicates to keep.

Multi-index hashing (Norouzi, Punjani and Fleet, "Fast search in Hamming space with multi-index
hashing", CVPR 2012) by the pigeonhole principle: cut the 64 bits into r + 1 disjoint substrings;
two hashes at most r bits apart differ in at most r substrings, so at least one substring is
equal. The candidates of a hash are the hashes that share one of its substrings exactly (a sorted
array and a binary search per substring); each candidate is then checked with one XOR and a
popcount. Nothing within r is missed, and `brute_force_pairs` (every pair) checks that.

Why this and not faiss: faiss-cpu's binary indexes (IndexBinaryMultiHash implements the same idea)
are a 30 MB compiled dependency for what is a sort and a search in numpy here, and the radius search
needs the exact pigeonhole guarantee, which this gives by construction. Its cost: with N hashes
and substrings of b = 64 / (r + 1) bits, a hash meets about (r + 1) N / 2^b candidates, so the
search stays near-linear while 2^b is near N or above (r <= 3 at 1M hashes: 16-bit substrings);
at r = 4-7 the candidates grow as N^2 / 2^b, which docs/DATA.md measures at 1M hashes.
"""
from __future__ import annotations

import numpy as np

CHUNK_CANDIDATES = 4_000_000  # candidate pairs checked at a time (memory: ~100 MB of index arrays)


def substrings(radius: int) -> list[tuple[int, int]]:
    """(shift, bits) of the radius + 1 disjoint substrings of 64 bits, as even as they come."""
    m = radius + 1
    sizes = [64 // m + (1 if k < 64 % m else 0) for k in range(m)]
    return [(sum(sizes[:k]), sizes[k]) for k in range(m)]


def _candidates(ka: np.ndarray, kb: np.ndarray, self_join: bool):
    """Chunks of (i, j): every pair with ka[i] == kb[j] (i < j when a and b are one set)."""
    order = np.argsort(kb, kind="stable")
    sorted_b = kb[order]
    lo = np.searchsorted(sorted_b, ka, "left")
    counts = np.searchsorted(sorted_b, ka, "right") - lo
    ends = np.cumsum(counts)
    start = 0
    while start < len(ka):
        # as many rows of a as keep the chunk's candidates under the cap (at least one row)
        stop = max(start + 1, int(np.searchsorted(ends, (ends[start - 1] if start else 0) + CHUNK_CANDIDATES, "right")))
        c = counts[start:stop]
        rows = np.repeat(np.arange(start, stop), c)
        within = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        cols = order[np.repeat(lo[start:stop], c) + within]
        if self_join:
            keep = rows < cols
            rows, cols = rows[keep], cols[keep]
        yield rows, cols
        start = stop


def near_pairs(a: np.ndarray, radius: int, b: np.ndarray | None = None) -> np.ndarray:
    """[P, 2] int64 (i, j) with popcount(a[i] ^ x[j]) <= radius, x = b, or x = a with i < j; each
    pair once, sorted. a, b: uint64 arrays."""
    a = np.asarray(a, dtype=np.uint64)
    x = a if b is None else np.asarray(b, dtype=np.uint64)
    if radius < 0 or not len(a) or not len(x):
        return np.zeros((0, 2), dtype=np.int64)
    if radius >= 63:  # every substring would be a bit or less: all pairs are candidates anyway
        return brute_force_pairs(a, radius, b)
    found = []
    for shift, bits in substrings(radius):
        mask = np.uint64((1 << bits) - 1)
        ka, kx = (a >> np.uint64(shift)) & mask, (x >> np.uint64(shift)) & mask
        for rows, cols in _candidates(ka, kx, b is None):
            close = np.bitwise_count(a[rows] ^ x[cols]) <= radius
            found.append(rows[close] * len(x) + cols[close])  # one int per pair: np.unique dedups
    codes = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
    return np.stack([codes // len(x), codes % len(x)], axis=1).astype(np.int64)


def brute_force_pairs(a: np.ndarray, radius: int, b: np.ndarray | None = None, block: int = 2048) -> np.ndarray:
    """near_pairs by comparing every pair (the baseline of the tests and the benchmark)."""
    a = np.asarray(a, dtype=np.uint64)
    x = a if b is None else np.asarray(b, dtype=np.uint64)
    out = []
    for start in range(0, len(a), block):
        d = np.bitwise_count(a[start:start + block, None] ^ x[None, :])
        i, j = np.nonzero(d <= radius)
        i += start
        keep = i < j if b is None else slice(None)
        out.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, 2), dtype=np.int64)


def greedy_keep(hashes: np.ndarray, priority: np.ndarray, radius: int) -> np.ndarray:
    """For each hash, -1 if it is kept, else the index of a kept hash within `radius` of it.

    Hashes are taken in `priority` order (a permutation, best first); each is kept unless a hash
    already kept is within the radius. So every dropped one has a kept near duplicate, no two kept
    ones are near duplicates, and unlike connected components a chain a ~ b ~ c whose ends are far
    apart does not drop c for a. Identical hashes are searched once (web data holds thousands
    of re-encoded copies of one placeholder image, which would fill one bucket)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    out = np.full(len(hashes), -1, dtype=np.int64)
    if not len(hashes):
        return out
    rank = np.empty(len(hashes), dtype=np.int64)
    rank[priority] = np.arange(len(hashes))
    values, inverse = np.unique(hashes, return_inverse=True)
    best = np.full(len(values), len(hashes), dtype=np.int64)  # the best-ranked member of each value
    np.minimum.at(best, inverse, rank)
    best_index = priority[best]
    pairs = near_pairs(values, radius)
    # orient each pair from the value whose best member comes first to the other
    swap = best[pairs[:, 0]] > best[pairs[:, 1]]
    first, second = np.where(swap, pairs[:, 1], pairs[:, 0]), np.where(swap, pairs[:, 0], pairs[:, 1])
    by_second = np.argsort(second, kind="stable")
    first, second = first[by_second], second[by_second]
    starts = np.searchsorted(second, np.arange(len(values) + 1))
    keeper = np.arange(len(values))  # the kept value that covers each one (itself when kept)
    has_earlier = np.flatnonzero(starts[1:] > starts[:-1])  # only these can be dropped
    for v in has_earlier[np.argsort(best[has_earlier], kind="stable")]:
        kept_before = [f for f in first[starts[v]:starts[v + 1]] if keeper[f] == f]
        if kept_before:
            keeper[v] = min(kept_before, key=lambda f: best[f])
    cover = best_index[keeper[inverse]]
    dropped = cover != np.arange(len(hashes))
    out[dropped] = cover[dropped]
    return out

"""Pairs of 64-bit perceptual hashes within a Hamming radius r, found with multi-index hashing
instead of comparing all pairs, and the greedy choice of which near duplicates to keep.

Multi-index hashing (Norouzi, Punjani and Fleet, "Fast search in Hamming space with multi-index
hashing", CVPR 2012) by the pigeonhole principle: cut the 64 bits into m disjoint substrings; two
hashes at most r bits apart differ in at most r bits over the m substrings together, so in one
substring they differ in at most floor(r / m) bits. The candidates of a hash are the hashes whose
substring equals one of its own with at most that many bits flipped (a lookup per flip pattern in
a table of the sorted substrings); each candidate is then checked with one XOR and a popcount.
Nothing within r is missed, and `brute_force_pairs` (every pair) checks that.

m trades lookups against candidates: m = r + 1 needs one lookup per substring, but substrings of
64 / (r + 1) bits put N / 2^(64 / (r + 1)) hashes in each bucket, so the candidates grow as N^2;
fewer, longer substrings need more flip patterns but meet almost only true neighbours. `pieces`
picks the m of least estimated work for N and r (Norouzi et al. find m near 64 / log2 N best).

Why this and not faiss: faiss-cpu's IndexBinaryMultiHash implements the same idea, but it is a
30 MB compiled dependency for what is a sort, a table and a gather in numpy here, and the radius
search must not miss a pair, which the pigeonhole bound gives by construction.
"""
from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np

CHUNK_CANDIDATES = 4_000_000  # candidate pairs checked at a time (memory: ~100 MB of index arrays)
TABLE_BITS = 25  # substrings up to this long are looked up in a table of 2^bits bucket starts


def substrings(m: int) -> list[tuple[int, int]]:
    """(shift, bits) of m disjoint substrings of 64 bits, as even as they come."""
    sizes = [64 // m + (1 if k < 64 % m else 0) for k in range(m)]
    return [(sum(sizes[:k]), sizes[k]) for k in range(m)]


def pieces(n: int, radius: int) -> int:
    """The number of substrings with the least estimated work for n hashes: per hash, the flip
    patterns looked up (sum of C(b, k), k <= r // m) times (one lookup + the n / 2^b candidates
    each finds)."""
    def work(m):
        b = 64 // m
        return m * sum(comb(b, k) for k in range(radius // m + 1)) * (1 + n / 2 ** b)
    return min(range(1, min(radius, 63) + 2), key=work)


def _flips(bits: int, within: int) -> np.ndarray:
    """Every `bits`-bit pattern with at most `within` ones."""
    return np.array([sum(1 << i for i in ones) for k in range(within + 1) for ones in combinations(range(bits), k)],
                    dtype=np.uint64)


class _Buckets:
    """The hashes of one substring, sorted, with each key's first position and count."""

    def __init__(self, keys: np.ndarray, bits: int):
        self.order = np.argsort(keys, kind="stable")
        self.sorted = keys[self.order]
        self.table = None
        if bits <= TABLE_BITS:  # direct addressing: one gather per lookup instead of a binary search
            self.table = np.concatenate([[0], np.cumsum(np.bincount(keys.astype(np.int64), minlength=2 ** bits))])

    def find(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.table is not None:
            q = queries.astype(np.int64)
            lo = self.table[q]
            return lo, self.table[q + 1] - lo
        lo = np.searchsorted(self.sorted, queries, "left")
        return lo, np.searchsorted(self.sorted, queries, "right") - lo


def _candidates(queries: np.ndarray, buckets: _Buckets, self_join: bool):
    """Chunks of (i, j) with queries[i] == the substring of hash j (i < j when one set)."""
    lo, counts = buckets.find(queries)
    rows_with = np.flatnonzero(counts)
    lo, counts = lo[rows_with], counts[rows_with]
    ends = np.cumsum(counts)
    start = 0
    while start < len(rows_with):
        # as many rows as keep the chunk's candidates under the cap (at least one row)
        stop = max(start + 1, int(np.searchsorted(ends, (ends[start - 1] if start else 0) + CHUNK_CANDIDATES, "right")))
        c = counts[start:stop]
        rows = np.repeat(rows_with[start:stop], c)
        within = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        cols = buckets.order[np.repeat(lo[start:stop], c) + within]
        if self_join:
            keep = rows < cols
            rows, cols = rows[keep], cols[keep]
        yield rows, cols
        start = stop


def near_pairs(a: np.ndarray, radius: int, b: np.ndarray | None = None, m: int | None = None) -> np.ndarray:
    """[P, 2] int64 (i, j) with popcount(a[i] ^ x[j]) <= radius, x = b, or x = a with i < j; each
    pair once, sorted. a, b: uint64 arrays. m: the substrings (default: `pieces`)."""
    a = np.asarray(a, dtype=np.uint64)
    x = a if b is None else np.asarray(b, dtype=np.uint64)
    if radius < 0 or not len(a) or not len(x):
        return np.zeros((0, 2), dtype=np.int64)
    m = m or pieces(len(x), radius)
    found = []
    for shift, bits in substrings(m):
        mask = np.uint64((1 << bits) - 1)
        ka, kx = (a >> np.uint64(shift)) & mask, (x >> np.uint64(shift)) & mask
        buckets = _Buckets(kx, bits)
        for flip in _flips(bits, radius // m):
            for rows, cols in _candidates(ka ^ flip, buckets, b is None):
                close = np.bitwise_count(a[rows] ^ x[cols]) <= radius
                found.append(rows[close] * len(x) + cols[close])  # one int per pair: np.unique dedups
    codes = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
    return np.stack([codes // len(x), codes % len(x)], axis=1).astype(np.int64)


def brute_force_pairs(a: np.ndarray, radius: int, b: np.ndarray | None = None) -> np.ndarray:
    """near_pairs by comparing every pair (the baseline of the tests and the benchmark)."""
    a = np.asarray(a, dtype=np.uint64)
    x = a if b is None else np.asarray(b, dtype=np.uint64)
    block = max(1, 2 ** 22 // max(1, len(x)))  # rows at a time: 4M comparisons, 32 MB
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

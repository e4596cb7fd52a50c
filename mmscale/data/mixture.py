"""Weighted mixtures of indexed shard sources (`data.sources`), as a pure function of the epoch.

An epoch draws `epoch_size` samples (a multiple of the global batch). Source s gets n_s of them, its weight's share (largest
remainder, so the shares add up exactly), taken in order from its own endless sequence of
seeded permutations: without replacement until the source is used up, then a fresh permutation.
A small source with a large weight is therefore seen whole before any of its samples repeats,
and a large one with a small weight is walked through over several epochs. The epoch's draws
are shuffled together.

Epoch e's draws from source s are positions [e * n_s, (e + 1) * n_s) of that sequence, so the
order of any epoch is computed from (seed, epoch) alone: BatchStream cuts it into global batches
as it cuts a plain permutation, and a run resumed at (epoch, step), on any number of ranks, sees
the samples an uninterrupted one would.
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from ..seeds import torch_generator


def shares(total: int, weights: list[float]) -> list[int]:
    """total split in proportion to weights, rounded by largest remainder (sums to total)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[:total - sum(counts)]:
        counts[i] += 1
    return counts


class SourceMixture:
    """The epoch order over sources laid end to end in one dataset (source s holds the indices
    offsets[s] .. offsets[s] + sizes[s] - 1)."""

    def __init__(self, names: list[str], sizes: list[int], weights: list[float], epoch_size: int, seed: int,
                 batch: int = 1):
        """epoch_size 0: the sources' samples together; rounded down to a multiple of `batch` (the
        global batch), so that every sample an epoch draws is trained on and counted."""
        for name, size, w in zip(names, sizes, weights):
            if size <= 0:
                raise ConfigError(f"data.sources: {name} has no readable samples; remove it or rebuild its shards")
            if not w > 0:
                raise ConfigError(f"data.sources: {name} has weight {w}; weights must be > 0")
        self.names, self.sizes, self.seed = names, sizes, seed
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.epoch_size = (epoch_size or sum(sizes)) // batch * batch
        self.counts = shares(self.epoch_size, weights)

    def _permutation(self, source: int, k: int) -> torch.Tensor:
        g = torch_generator("source_order", self.seed, source, k)
        return torch.randperm(self.sizes[source], generator=g)

    def _draws(self, source: int, start: int, n: int) -> torch.Tensor:
        """Positions start .. start + n - 1 of source's permutation sequence, as dataset indices."""
        size, out = self.sizes[source], []
        pos = start
        while pos < start + n:
            k, j = divmod(pos, size)
            take = min(size - j, start + n - pos)
            out.append(self._permutation(source, k)[j:j + take])
            pos += take
        return torch.cat(out) + self.offsets[source] if out else torch.empty(0, dtype=torch.long)

    def order(self, epoch: int) -> torch.Tensor:
        draws = torch.cat([self._draws(s, epoch * n, n) for s, n in enumerate(self.counts)])
        g = torch_generator("epoch_order", self.seed, epoch)
        return draws[torch.randperm(len(draws), generator=g)]

    def source_of(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(indices, torch.tensor(self.offsets[1:]), right=True)

    def drawn(self, epoch: int, taken: torch.Tensor) -> dict[str, int]:
        """{source name: samples drawn from it}: the epochs before `epoch` and `taken`, the part of
        epoch `epoch`'s order used so far."""
        counts = torch.bincount(self.source_of(taken), minlength=len(self.sizes)).tolist()
        return {name: epoch * n + c for name, n, c in zip(self.names, self.counts, counts)}

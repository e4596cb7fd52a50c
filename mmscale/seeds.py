"""Every stream of randomness in a run, derived in one place from (seed, purpose, keys).

Exact resume rests on this: each draw is a pure function of the recipe's seed and of where the
run is (epoch, step, rank, sample, shard, draw), never of state a process carries, so a resumed or
re-split run makes the draws the uninterrupted one made. `seed_for(purpose, seed, *keys)` is the
one function that turns them into a seed; `torch_generator`, `seed_torch` and `numpy_rng` hand it
to the library that draws. No other module computes a seed (tests/test_layout.py checks).

Each purpose keeps the formula it had when the sample orders in docs/RESULTS.md were measured: a
new formula would change every documented run's samples. A new purpose should use `mix`, a
stateless 64-bit hash (splitmix64 folded over its integers).
"""
from __future__ import annotations

import numpy as np
import torch

_MASK = (1 << 64) - 1


def mix(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 folded over them): a pick or a seed that has no state
    beyond the numbers it is given."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK)) + 0x9E3779B97F4A7C15 & _MASK
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 31
    return h


# purpose: (its keys, the formula). Python's hash of a tuple of ints is not salted per process.
PURPOSES = {
    # the model's initial weights: the same on every rank
    "init": ((), lambda seed: seed),
    # a training step's own draws on this rank (dropout, mixing partners within the rank's rows)
    "step": (("step", "rank"), lambda seed, step, rank: hash((seed, step, rank)) % 2 ** 62),
    # a training step's draws shared by every rank (mixing over the global batch)
    "global_step": (("step",), lambda seed, step: hash((seed, step)) % 2 ** 62),
    # an epoch's sample order (BatchStream's permutation, a mixture's order of sources)
    "epoch_order": (("epoch",), lambda seed, epoch: (seed * 100_003 + epoch) % 2 ** 63),
    # the k-th permutation of one weighted source's samples (drawn without replacement)
    "source_order": (("source", "k"), lambda seed, source, k: ((seed * 1_000_003 + source) * 1_000_003 + k) % 2 ** 63),
    # a sample's random augmentation, keyed by its place in the epoch
    "augment": (("epoch", "sample"), lambda seed, epoch, j: (seed * 1_000_003 + epoch) * 10_000_019 + j),
    # the stand-in for an unreadable sample: a pick over the dataset for (epoch, index, try)
    "replace": (("epoch", "index", "try"), lambda seed, epoch, i, k: mix(seed, epoch, i, k)),
    # a streamed run's shard order, pass after pass
    "shard_pass": (("pass",), lambda seed, p: seed * 1_000_003 + p),
    # a streamed slot's shuffle-buffer pick
    "buffer_pick": (("slot", "draw"), lambda seed, slot, draw: mix(seed, slot, draw)),
    # a streamed sample's augmentation, keyed by its place in the shard order
    "stream_augment": (("shard", "offset"), lambda seed, shard, offset: mix(seed, shard, offset) >> 1),
    # held-out splits (stratified, CBMF's validation groups, a permutation of the features)
    "split": ((), lambda seed: seed),
    # the order a validation loss batches its rows in (CBMF's val/loss)
    "val_batches": ((), lambda seed: seed),
    # synthetic benchmark pairs, each made from its index alone
    "synthetic": ((), lambda index: index),
}


def seed_for(purpose: str, seed: int, *keys: int) -> int:
    """The seed of `purpose` for the recipe's `seed` at `keys` (see PURPOSES for each one's keys)."""
    names, formula = PURPOSES[purpose]
    if len(keys) != len(names):
        raise TypeError(f"seeds: {purpose!r} takes the keys ({', '.join(names)}), got {len(keys)} keys")
    return formula(seed, *keys)


def torch_generator(purpose: str, seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(purpose, seed, *keys))


def seed_torch(purpose: str, seed: int, *keys: int) -> None:
    """Seeds torch's global generator (what dropout and the transforms draw from)."""
    torch.manual_seed(seed_for(purpose, seed, *keys))


def numpy_rng(purpose: str, seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(seed_for(purpose, seed, *keys))

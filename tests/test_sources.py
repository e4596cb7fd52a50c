"""Weighted shard sources (data.sources, mmscale/data/mixture.py) in process: each epoch's shares,
no repeat inside a source before it is used up, batches split over any number of ranks, exact
resume from (epoch, step), the per-source counts, and one line for a bad source."""
import math
import os

import pytest
import torch

from conftest import ROOT
from helpers import write_digit_shards
from mmscale.data.mixture import SourceMixture, shares
from mmscale.data.batches import BatchStream

NAMES, SIZES, WEIGHTS = ["big", "small", "mid"], [500, 40, 200], [1.0, 2.0, 1.0]


def test_shares_add_up_and_follow_the_weights():
    assert shares(10, [1, 1, 1]) == [4, 3, 3] and sum(shares(7, [0.2, 0.5, 0.3])) == 7
    assert shares(1000, [3, 1]) == [750, 250]


def test_each_epoch_draws_the_weights_share_without_repeats_until_a_source_is_used_up():
    mix = SourceMixture(NAMES, SIZES, WEIGHTS, epoch_size=400, seed=3)
    assert mix.counts == [100, 200, 100]
    epochs = [mix.order(e) for e in range(6)]
    for order in epochs:
        assert len(order) == 400
        assert torch.bincount(mix.source_of(order), minlength=3).tolist() == mix.counts
    for s, (offset, size) in enumerate(zip(mix.offsets, SIZES)):
        # the source's draws, epoch after epoch: each epoch's are the next ones of its sequence,
        # and every full pass over the source (the sequence cut every `size`) is a permutation of it
        ordered = torch.cat([mix._draws(s, e * mix.counts[s], mix.counts[s]) for e in range(6)]) - offset
        for e, o in enumerate(epochs):
            mine = ordered[e * mix.counts[s]:(e + 1) * mix.counts[s]]
            assert sorted((o[mix.source_of(o) == s] - offset).tolist()) == sorted(mine.tolist())
        for i in range(0, len(ordered) - size + 1, size):
            assert sorted(ordered[i:i + size].tolist()) == list(range(size)), (NAMES[s], i)
    assert len(torch.cat([o[mix.source_of(o) == 0] for o in epochs[:5]]).unique()) == 500  # big: seen once in 5 epochs
    assert torch.equal(SourceMixture(NAMES, SIZES, WEIGHTS, 400, 3).order(4), epochs[4])  # (seed, epoch) alone
    assert not torch.equal(SourceMixture(NAMES, SIZES, WEIGHTS, 400, 4).order(4), epochs[4])


def test_a_batch_draws_each_source_within_its_hypergeometric_bounds():
    """Inside an epoch the shuffled draws put each source into a batch of 64 as a sample without
    replacement of the epoch's 400: the count of 'small' (200 of 400) in a batch has mean 32 and
    sd sqrt(64 * 1/2 * 1/2 * 336/399); over 60 batches all stay within 4 sd."""
    mix = SourceMixture(NAMES, SIZES, WEIGHTS, epoch_size=400, seed=0)
    sd = math.sqrt(64 * 0.25 * 336 / 399)
    counts = []
    for e in range(10):
        order = mix.order(e)
        counts += [(mix.source_of(order[i:i + 64]) == 1).sum().item() for i in range(0, 384, 64)]
    assert all(abs(c - 32) <= 4 * sd for c in counts), counts
    assert abs(sum(counts) / len(counts) - 32) < 4 * sd / math.sqrt(len(counts))


class Indexed(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def streams(world, mixture):
    return [BatchStream(Indexed(sum(SIZES)), None, 64, r, world, seed=0, mixture=mixture) for r in range(world)]


def test_batches_split_over_any_world_and_resume_at_the_step():
    mix = SourceMixture(NAMES, SIZES, WEIGHTS, epoch_size=400, seed=0, batch=64)
    assert mix.epoch_size == 384 and sum(mix.counts) == 384  # whole batches: every drawn sample is trained on
    one, two = streams(1, mix), streams(2, mix)
    assert one[0].steps_per_epoch == 6
    for epoch, step in [(0, 0), (0, 5), (3, 2)]:
        whole = one[0].local_indices(epoch, step)
        assert whole == two[0].local_indices(epoch, step) + two[1].local_indices(epoch, step)
    # a stream loaded with a checkpoint's position continues with the batches of an uninterrupted one
    resumed = streams(2, mix)[1]
    resumed.load_state_dict({"epoch": 3, "step": 2, "global_batch": 64})
    assert [resumed.local_indices(3, s) for s in range(2, 6)] == [two[1].local_indices(3, s) for s in range(2, 6)]
    # the per-source counts: every sample of the epochs before, and this epoch's batches so far
    resumed.load_state_dict({"epoch": 3, "step": 2, "global_batch": 64})
    metrics = resumed.metrics()
    taken = torch.cat([torch.tensor([i for _, _, i in one[0].local_indices(3, s)]) for s in range(2)])
    now = torch.bincount(mix.source_of(taken), minlength=3).tolist()
    assert metrics == {f"samples/{n}": 3 * c + k for n, c, k in zip(NAMES, mix.counts, now)}
    assert sum(metrics.values()) == (3 * 6 + 2) * 64


def test_a_bad_source_is_one_line(tmp_path):
    from mmscale.config import ConfigError, load_config
    from mmscale.data.indexed_shards import ShardDataset, write_index
    tiny = os.path.join(ROOT, "recipes", "tiny.yaml")
    write_digit_shards(str(tmp_path / "a"), per_shard=20, shards=1)
    os.makedirs(tmp_path / "empty")
    write_index(str(tmp_path / "empty"), [])

    def cfg(sources, *more):
        return load_config(tiny, ["data.type=shards", f"data.sources={sources}", *more], check_files=False)

    a = f"{{shards: {tmp_path / 'a'}, weight: 1}}"
    for sources, more, match in [
        (f"[{a}, {{shards: {tmp_path / 'b'}, weight: 0}}]", [], r"data.sources.1.weight: must be a number > 0, got 0"),
        (f"[{a}, {{shards: {tmp_path / 'x' / 'a'}}}]", [], r"two sources are named 'a'; give each a name:"),
        (f"[{a}, {{path: {tmp_path}}}]", [], r"data.sources.1: expected \{shards: DIR"),
        (f"[{a}]", [f"data.shards={tmp_path / 'a'}"], r"in place of data.shards"),
    ]:
        with pytest.raises(ConfigError, match=match):
            cfg(sources, *more)
    with pytest.raises(ConfigError, match=r"data.sources.1.shards: no shard index in"):
        load_config(tiny, ["data.type=shards", f"data.sources=[{a}, {{shards: {tmp_path / 'nowhere'}}}]"])
    ok = cfg(f"[{a}, {{shards: {tmp_path / 'empty'}, name: e}}]")
    with pytest.raises(ConfigError, match=r"no readable shard in .*empty"):
        ShardDataset([s["shards"] for s in ok.data.sources], None)
    with pytest.raises(ConfigError, match="e has no readable samples"):
        SourceMixture(["a", "e"], [20, 0], [1, 1], 0, 0)

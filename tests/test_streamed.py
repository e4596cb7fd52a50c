"""data.type webdataset (data/tar_stream.py): streamed shards that resume exactly on the same ranks
and loader workers, and re-split without skipping on others. Ranks are simulated in-process
(each ShardStream is one rank's); the loader workers are real processes."""
import pytest
import torch

from helpers import write_digit_shards
from mmscale.data.images import image_transform
from mmscale.data.tar_stream import ShardOrder, ShardStream
from mmscale.seeds import mix


def collate(items):
    return {"image": torch.stack([i[0] for i in items]), "caption": [i[1] for i in items],
            "skipped": sum(i[3] for i in items)}


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    # 3 shards of 40 samples captioned "sample K", their keys numbered 0..119
    return write_digit_shards(str(tmp_path_factory.mktemp("wds")), per_shard=40, shards=3, numbered=True)


def stream(urls, rank, world, workers=0, buffer=30, seed=0):
    return ShardStream(urls, 120, image_transform(16, train=True), collate, global_batch=20, rank=rank,
                       world=world, seed=seed, num_workers=workers, shuffle_buffer=buffer)


def run(streams, steps):
    """`steps` batches from every rank: [(ids, images)] per rank."""
    out = []
    for s in streams:
        it = iter(s)
        got = []
        for _ in range(steps):
            batch = next(it)
            got.append((list(s.last_ids), batch["image"]))
        out.append(got)
    return out


def checkpoint(streams) -> dict:
    """What the checkpoint holds: rank 0's state with every rank's positions (state_dict gathers
    them over real ranks)."""
    state = streams[0].state_dict()
    for s in streams[1:]:
        state["positions"].update(s.state_dict()["positions"])
    return state


def number(sample_id: str) -> int:
    return int(sample_id.rsplit("/", 1)[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_sees_exactly_the_uninterrupted_samples(urls, workers):
    """2 ranks x `workers` loader workers: 5 steps, a checkpoint, 7 more in new streams equal 12
    in one go, sample by sample (ids and augmented images), on both ranks; the positions are
    what makes it so (a resume that keeps only the step draws other samples)."""
    reference = run([stream(urls, r, 2, workers) for r in range(2)], 12)
    first = [stream(urls, r, 2, workers) for r in range(2)]
    before = run(first, 5)
    state = checkpoint(first)
    assert (state["epoch"], state["step"]) == (0, 5) and len(state["positions"]) == 2 * max(1, workers)
    resumed = [stream(urls, r, 2, workers) for r in range(2)]
    for s in resumed:
        s.load_state_dict(state)
    after = run(resumed, 7)
    for r in range(2):
        assert [ids for ids, _ in before[r] + after[r]] == [ids for ids, _ in reference[r]], r
        for (_, a), (_, b) in zip(before[r] + after[r], reference[r]):
            assert torch.equal(a, b)
    assert (resumed[0].epoch, resumed[0].step) == (2, 0)  # 6 steps an epoch (120 samples, batches of 20)
    # the step alone (positions dropped) is not enough: the samples differ
    stepped_only = stream(urls, 0, 2, workers)
    stepped_only.load_state_dict({**state, "positions": {}})
    assert [ids for ids, _ in run([stepped_only], 7)[0]] != [ids for ids, _ in after[0]]


def test_streams_read_their_own_shards_shuffled_and_reproducibly(urls):
    a, b = run([stream(urls, r, 2) for r in range(2)], 4)
    assert [ids for ids, _ in a] == [ids for ids, _ in run([stream(urls, 0, 2)], 4)[0]]  # reproducible
    assert [ids for ids, _ in a] != [ids for ids, _ in run([stream(urls, 0, 2, seed=1)], 4)[0]]
    # a full buffer (30 of a shard's 40) before the first pick: each rank's first batch is of its first shard
    shard_a, shard_b = ({i.split("/")[0] for i in batch[0][0]} for batch in (a, b))
    assert len(shard_a) == len(shard_b) == 1 and shard_a != shard_b
    numbers = [number(i) for i in a[0][0]]
    assert len(numbers) == 10 and any(y - x != 1 for x, y in zip(numbers, numbers[1:]))  # shuffled
    # without a buffer the stream is the shards in order
    plain = run([stream(urls, 0, 1, buffer=0)], 6)[0]
    order = ShardOrder(urls, 0)
    first_shard = int(order[0].rsplit("/", 1)[1].split(".")[0])
    assert [number(i) for i in plain[0][0]] == list(range(40 * first_shard, 40 * first_shard + 20))


def test_the_shard_order_is_pass_after_pass_and_the_hash_is_stable(urls):
    order = ShardOrder(urls, 7)
    passes = [[order[p * 3 + i] for i in range(3)] for p in range(4)]
    assert all(sorted(p) == sorted(order.urls) for p in passes) and len({tuple(p) for p in passes}) > 1
    assert mix(1, 2, 3) == mix(1, 2, 3) != mix(1, 2, 4) and 0 <= mix(5) < 2 ** 64


def test_another_number_of_streams_restarts_at_the_oldest_buffered_shard_and_skips_nothing(urls, capsys):
    """2 ranks x 2 workers, then 1 rank x 1: one line says what happens; every sample of the
    shard order's first pass is seen by the end (nothing skipped), the new stream starting at
    or before the oldest shard a buffer held."""
    first = [stream(urls, r, 2, workers=2) for r in range(2)]
    before = run(first, 3)
    state = checkpoint(first)
    one = stream(urls, 0, 1)
    capsys.readouterr()
    one.load_state_dict(state)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 ranks x 2 loader workers" in err[0] and "this run has 1 x 1" in err[0], err
    assert f"restarts at shard {one.base} of the shard order" in err[0]
    # 4 slots, each started at its own place: the oldest shard needed is at most slot 0's first
    assert one.base == 0
    after = run([one], 12)[0]
    seen = {number(i) for rank in before for ids, _ in rank for i in ids} | {number(i) for ids, _ in after for i in ids}
    assert seen == set(range(120))
    # with positions past the first shards, the restart moves on: slot 0 alone read past order[0..]
    late = [stream(urls, 0, 1, buffer=0)]
    run(late, 5)  # 100 samples: two and a half shards, nothing buffered
    two = stream(urls, 0, 2)
    two.load_state_dict(checkpoint(late))
    assert two.base == 2


def test_a_stream_with_no_sample_is_one_line(tmp_path):
    import tarfile
    path = tmp_path / "empty.tar"
    with tarfile.open(path, "w"):
        pass
    s = ShardStream(str(path), 40, image_transform(16, train=False), collate, global_batch=20, rank=0, world=1)
    with pytest.raises(Exception, match="none of the 1 shards holds a sample"):
        next(iter(s))

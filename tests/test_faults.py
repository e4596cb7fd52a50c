"""Faults a long run meets (issue 21): bad shards, corrupt checkpoints, a full disk. Each test
breaks something, checks the one line and the exit code, then reruns and checks that the run
continues from the last good state with nothing lost."""
import json
import os
import subprocess
import warnings

import pytest
import torch

from conftest import PY, ROOT
from test_data import write_digit_shards
from test_engine import launch, step_losses


def damage(path, how):
    if how == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    elif how == "missing":
        os.remove(path)
    elif how == "zero_byte":
        open(path, "wb").close()
    elif how == "not_tar":
        open(path, "wb").write(b"this is not a tar file\n" * 100)


HOWS = ["truncated", "missing", "zero_byte", "not_tar"]


@pytest.mark.parametrize("how", HOWS)
def test_a_bad_shard_is_dropped_at_start_up_with_one_line(how, tmp_path, capfd):
    from mmscale.config import ConfigError
    from mmscale.data.images import image_transform
    from mmscale.data.shards import ShardDataset
    write_digit_shards(str(tmp_path), per_shard=10, shards=3)
    damage(str(tmp_path / "00001.tar"), how)
    ds = ShardDataset(str(tmp_path), image_transform(32, train=False))
    err = capfd.readouterr().err.strip().splitlines()
    assert len(ds) == 20 and [s["url"][-9:] for s in ds.shardlist] == ["00000.tar", "00002.tar"]
    assert len(err) == 1 and "00001.tar" in err[0] and "10 samples are lost" in err[0], err
    assert all(ds[(0, 0, i)][3] == 0 for i in range(20))  # the others read whole
    with pytest.raises(ConfigError, match="00001.tar .*10 samples are lost"):
        ShardDataset(str(tmp_path), image_transform(32, train=False), on_bad_shard="error")


def test_a_shard_that_breaks_mid_run_loses_its_samples_to_the_skip_counter(tmp_path):
    from mmscale.data.images import image_transform
    from mmscale.data.shards import ShardDataset
    write_digit_shards(str(tmp_path), per_shard=10, shards=3)
    ds = ShardDataset(str(tmp_path), image_transform(32, train=False))
    assert len(ds) == 30
    damage(str(tmp_path / "00001.tar"), "truncated")  # after the start-up check
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[(0, 0, i)] for i in range(30)]
    skipped = [it[3] for it in items]
    assert skipped[:10] == [0] * 10 and skipped[20:] == [0] * 10
    # the samples before the cut read; each one after it is replaced by shard 2's first and counted once
    lost = sum(skipped[10:20])
    assert 1 <= lost <= 9 and skipped[10:20] == [0] * (10 - lost) + [1] * lost
    assert all(torch.equal(it[0], items[20][0]) for it in items[20 - lost:20])
    assert any("became unreadable" in str(w.message) for w in caught)

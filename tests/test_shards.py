"""tools/build_shards.py end to end: the real img2dataset against a loopback HTTP server."""
import json

import pytest

from helpers import photo_site
from mmscale.data.shard_builder import BuildOptions, build_shards


@pytest.fixture
def site(tmp_path):
    tsv, server = photo_site(tmp_path)
    yield tsv, server
    server.close()


def test_every_counter_and_resume(site, tmp_path):
    tsv, server = site
    out = tmp_path / "shards"
    opts = BuildOptions(image_size=64, shard_size=4, threads=4, processes=1, min_image_size=200, max_caption_words=64)
    summary = build_shards(str(tsv), str(out), opts)
    assert summary["requested"] == 16
    assert summary["filtered"] == {"caption_empty": 2, "caption_too_long": 1, "image_too_small": 3, "undecodable": 2}
    assert summary["attempted"] == 13
    assert summary["failed"] == {"HTTP Error 404: File not found": 2}
    assert summary["downloaded"] == 11
    assert summary["kept"] == 6
    index = json.load(open(out / "_meta" / "shards.json"))
    assert json.load(open(out / "_meta" / "summary.json")) == summary
    assert sum(s["nsamples"] for s in index["shardlist"]) == 6
    assert summary["shards"] == len(index["shardlist"]) >= 2
    import webdataset as wds
    samples = list(wds.WebDataset([str(out / s["url"]) for s in index["shardlist"]], shardshuffle=False).decode("pil"))
    assert len(samples) == 6
    assert {s["txt"] for s in samples} == {f"a photo number {i} of something" for i in range(6)}
    assert all(s["jpg"].size == (64, 64) for s in samples)

    hits = server.hits
    again = build_shards(str(tsv), str(out), opts)
    assert again == summary
    assert server.hits == hits, "a second run must resume, not download again"


def test_cli_names_missing_column(tmp_path):
    import subprocess, sys
    from conftest import ROOT
    csv = tmp_path / "x.csv"
    csv.write_text("text,link\nhello,http://127.0.0.1:9/a.jpg\n")
    r = subprocess.run([sys.executable, "tools/build_shards.py", str(csv), str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "column 'caption'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_unknown_distributor_is_one_line(tmp_path, capsys):
    from mmscale.cli.build_shards import main
    tsv = tmp_path / "x.tsv"
    tsv.write_text("a caption\thttp://127.0.0.1:9/a.jpg\n")
    assert main([str(tsv), str(tmp_path / "o"), "--distributor", "dask"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "build_shards: --distributor: 'dask' is not one of multiprocessing, pyspark, ray"
    assert not (tmp_path / "o").exists()

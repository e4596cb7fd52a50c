"""mmscale-build-shards --distributor pyspark on a real local Spark (pyspark from PyPI, a Java 17+
runtime): the same loopback site as tests/test_shards.py, built once with img2dataset's
multiprocessing distributor and once over Spark, gives the same summary (the counters summed over
Spark's workers), index and samples.

Opt-in, because it installs pyspark (a 450 MB package) and, where Java is missing, a Debian JRE:
    MMSCALE_SPARK_TESTS=1 .venv/bin/python -m pytest -q tests/test_spark.py
It skips with the reason, printed, when it cannot install them.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import photo_site
from mmscale.data.shard_builder import BuildOptions, build_shards


def _ready() -> str | None:
    """None when pyspark and Java work (installing them if needed), else why not."""
    if os.environ.get("MMSCALE_SPARK_TESTS") != "1":
        return "opt-in: MMSCALE_SPARK_TESTS=1 (installs pyspark and, if missing, a Debian JRE)"
    if not shutil.which("java"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            return "no java, and no root apt-get to install default-jre-headless"
        r = subprocess.run(["apt-get", "install", "-y", "-q", "default-jre-headless"], capture_output=True, text=True)
        if r.returncode:
            return f"apt-get install default-jre-headless failed: {r.stderr.strip().splitlines()[-1:]}"
    try:
        import pyspark  # noqa: F401
    except ImportError:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "pyspark"], capture_output=True, text=True)
        if r.returncode:
            return f"pip install pyspark failed: {r.stderr.strip().splitlines()[-1:]}"
    return None


REASON = _ready()
if REASON and os.environ.get("MMSCALE_SPARK_TESTS") == "1":
    print(f"tests/test_spark.py SKIPPED: {REASON}", file=sys.stderr)  # loudly: it was asked for
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=str(REASON))]


def test_spark_builds_what_multiprocessing_builds(tmp_path):
    import webdataset as wds
    tsv, server = photo_site(tmp_path)
    try:
        opts = dict(image_size=64, shard_size=4, threads=4, processes=2, min_image_size=200)
        local = build_shards(str(tsv), str(tmp_path / "local"), BuildOptions(**opts))
        spark = build_shards(str(tsv), str(tmp_path / "spark"), BuildOptions(**opts, distributor="pyspark"))
    finally:
        server.close()
    assert spark == local and spark["kept"] == 6 and spark["shards"] >= 2
    index = json.load(open(tmp_path / "spark" / "_meta" / "shards.json"))
    assert index["shardlist"] == json.load(open(tmp_path / "local" / "_meta" / "shards.json"))["shardlist"]

    def texts(folder):
        urls = [str(tmp_path / folder / s["url"]) for s in index["shardlist"]]
        return sorted(s["txt"] for s in wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert texts("spark") == texts("local") == sorted(f"a photo number {i} of something" for i in range(6))


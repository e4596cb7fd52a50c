"""tools/bench.py (mmscale-bench): a short CPU run of the recipe's real step, and of open_clip's
trainer beside it. The numbers belong in docs/PERFORMANCE.md; here only that they come out, with
every field, and that mmscale's own loop reads nothing back from the device on a step it does
not log."""
import json
import os
import subprocess

import pytest

from conftest import PY, ROOT

BENCH = os.path.join(os.path.dirname(PY), "mmscale-bench")


def bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    r = subprocess.run([BENCH, "recipes/tiny.yaml", *args, "--json", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "samples/s" in r.stdout and "host syncs/step" in r.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_measures_the_gradient_cached_step(tmp_path):
    # synthetic pairs and a tiled loss, as the loss-memory measurements of PERFORMANCE.md run it
    r = bench(tmp_path, "--synthetic", "--warmup", "1", "--steps", "2", "--split-steps", "1",
              "data.type=synthetic", "data.num_samples=80", "loss.tile=24")
    assert r["grad_cache_chunk"] == 16 and r["global_batch"] == 64 and r["samples_per_s"] > 0
    assert {"embed", "loss", "reforward_backward", "optimizer", "data_wait"} <= set(r["split_s"])
    # the phases are the step's profiler ranges (mmscale/<phase>), in the order they ran
    assert list(r["split_s"])[:4] == ["embed", "loss", "reforward_backward", "optimizer"]
    assert all(r["split_s"][k] > 0 for k in ("embed", "loss", "reforward_backward", "optimizer"))
    assert r["peak_memory_gb"] > 0.1 and r["memory_kind"] == "process peak RSS"
    assert 0.1 < r["memory_before_steps_gb"] <= r["peak_memory_gb"]
    f = r["flop_per_sample"]
    # chunk 16 of 64: every chunk but the last runs forward twice
    assert 0 < f["forward"] < f["forward_backward"]
    assert r["executed_flop_per_sample"] == pytest.approx(f["forward_backward"] + 3 / 4 * f["forward"])
    # ZeRO-2: DeepSpeed's overflow check reads the gradient norm; mmscale's loop reads nothing
    assert "mmscale" not in r["host_syncs_per_step"] and r["host_syncs_per_step"]["deepspeed"] >= 1
    assert r["attention"] == {"image": "timm F.scaled_dot_product_attention",
                              "text": "transformers attn_implementation=sdpa"}


@pytest.mark.slow
def test_bench_against_open_clips_trainer(tmp_path):
    """open_clip's smallest ViT in both trainers, 2 samples a step: the ratio comes out."""
    r = bench(tmp_path, "--vs-open-clip", "ViT-S-32-alt", "--batch", "2", "--chunk", "0", "--warmup", "1",
              "--steps", "1", "--split-steps", "1", "--no-flops", "--synthetic")
    assert r["open_clip"]["samples_per_s"] > 0 and r["vs_open_clip"] > 0
    assert "open_clip_train.main" in r["open_clip"]["command"] and "--model ViT-S-32-alt" in r["open_clip"]["command"]
    # the share of its step open_clip's trainer waited on its loader, read from its own log lines
    assert r["open_clip"]["workers"] == 1 and "--workers 1" in r["open_clip"]["command"]
    assert 0 <= r["open_clip"]["data_fraction"] < 1
    assert r["attention"]["image"] == "torch nn.MultiheadAttention (SDPA inside)"
    assert list(r["split_s"])[:4] == ["forward", "loss", "backward", "optimizer"]  # no gradient cache
    # --table puts the ratio in the row
    (tmp_path / "bench.json").write_text(json.dumps(r))
    t = subprocess.run([BENCH, "--table", str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=120)
    head, _, row = t.stdout.strip().splitlines()
    bare = r["vs_bare_open_clip"]  # open_clip's model in a bare loop, alternated with mmscale's step
    assert bare["steps"] == 1 and bare["bare_samples_per_s"] > 0 and bare["ratio"] > 0
    assert bare["ratio"] == pytest.approx(bare["mmscale_samples_per_s"] / bare["bare_samples_per_s"])
    assert head.endswith("| open_clip trainer samples/s | its data wait / step | mmscale / open_clip "
                         "| mmscale / bare open_clip loop, interleaved |")
    assert row.endswith(f"| {r['open_clip']['samples_per_s']:.3f} | {r['open_clip']['data_fraction']:.1%} "
                        f"| {r['vs_open_clip']:.2f} | {bare['ratio']:.2f} |")


def test_the_read_count_is_of_reads_on_the_steps_device():
    """A read counts when its tensor is on the step's device, filed under the package whose code
    reads: on CUDA a CPU tensor's value is the host's own (not counted); on a CPU run every read is."""
    import torch
    from mmscale.cli.bench.instruments import SyncCounter
    mmscale_code = {"__name__": "mmscale.engine.fake"}  # a function whose module is mmscale's
    exec("def read(t):\n    return t.item()\n", mmscale_code)
    t = torch.ones(())
    with SyncCounter(torch.device("cpu")) as on_cpu:
        mmscale_code["read"](t)
        bool(t)  # this test's own read: no known package
        t.tolist()
    with SyncCounter(torch.device("cuda")) as on_cuda:
        mmscale_code["read"](t)
        bool(t)
    assert on_cpu.counts == {"mmscale": 1, "other": 2} and not on_cuda.counts
    mmscale_code["read"](t)  # the wrappers came off when the block ended
    assert on_cpu.counts == {"mmscale": 1, "other": 2}

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
    # synthetic pairs and a tiled loss, as the loss-memory measurements of PERFORMANCE.md run it; as
    # rank 0 of 2 simulated ranks (32 samples each, 2 chunks), so the step's collectives are counted
    r = bench(tmp_path, "--synthetic", "--warmup", "1", "--steps", "2", "--split-steps", "1", "--simulate-ranks", "2",
              "data.type=synthetic", "data.num_samples=80", "loss.tile=24")
    assert r["grad_cache_chunk"] == 16 and r["global_batch"] == 64 and r["samples_per_s"] > 0
    assert r["world"] == 2 and r["simulated_ranks"] == 2
    comm = {(c["collective"], c["dtype"], c["package"]): c for c in r["collectives_per_step"]}
    # ZeRO 2, fp32: the gradients once a step, all-reduced in fp32 (coalesced over the 2 chunks: one
    # pass over every parameter's; DeepSpeed all-reduces the gradient norm, 4 bytes, beside it)
    grads = comm["all_reduce", "float32", "deepspeed"]
    assert grads["bytes"] == 4 * r["parameters"] + 4 and grads["calls"] == 2
    # the loss's gathers of the embeddings: image and text, 64 rows of 64 floats each
    assert comm["all_gather", "float32", "mmscale"]["bytes"] == 2 * 64 * 64 * 4
    assert {"embed", "loss", "reforward_backward", "reduce", "optimizer", "data_wait"} <= set(r["split_s"])
    # the phases are the step's profiler ranges (mmscale/<phase>), in the order they ran; reduce is
    # the coalesced reduction of ZeRO 2's gradients after the last chunk's backward
    assert list(r["split_s"])[:5] == ["embed", "loss", "reforward_backward", "reduce", "optimizer"]
    assert all(r["split_s"][k] > 0 for k in ("embed", "loss", "reforward_backward", "reduce", "optimizer"))
    assert r["peak_memory_gb"] > 0.1 and r["memory_kind"] == "process peak RSS"
    assert 0.1 < r["memory_before_steps_gb"] <= r["peak_memory_gb"]
    f = r["flop_per_sample"]
    # chunk 16 of 32 a rank: every chunk but the last runs forward twice
    assert 0 < f["forward"] < f["forward_backward"]
    assert r["executed_flop_per_sample"] == pytest.approx(f["forward_backward"] + 1 / 2 * f["forward"])
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


def _one_all_gather(rank, world, out_dir):
    import time

    import torch
    from torch.profiler import profile
    from mmscale.cli.bench.instruments import COMM, CommCounter, collective_rows, profiled_phases
    from mmscale.dist import gather_outputs
    x = {"x": torch.ones(256, 64)}
    gather_outputs(x)  # gloo's first collective sets up its pairs
    with profile() as prof:
        gather_outputs(x)
    tic = time.perf_counter()
    _, comm = profiled_phases(lambda: gather_outputs(x), torch.device("cpu"))
    wall = time.perf_counter() - tic
    with CommCounter() as count:
        gather_outputs(x)
    if rank == 0:
        torch.save({"rows": [e.name for e in collective_rows(prof.events())],
                    "matches": [e.name for e in prof.events() if COMM.search(e.name)],
                    "comm": comm, "wall": wall, "counted": count.table()}, os.path.join(out_dir, "gather.pt"))


def test_a_collective_is_timed_and_counted_once(tmp_path):
    """2 gloo ranks, one all-gather: the profiler shows it as several nested rows (the autograd
    function, c10d's op, gloo's work), each holding its children's time; the bench times it once,
    by gloo's row, so communication is never longer than the run that holds it; CommCounter counts
    one all-gather of the whole output (2 ranks x 256 x 64 floats), called by mmscale."""
    import torch
    from distributed import run_ranks
    run_ranks(_one_all_gather, 2, str(tmp_path))
    got = torch.load(tmp_path / "gather.pt")
    assert len(got["matches"]) >= 3, got["matches"]
    assert got["rows"] == ["gloo:all_gather"], got["rows"]
    assert 0 < got["comm"] <= got["wall"]
    assert got["counted"] == [{"collective": "all_gather", "dtype": "float32", "package": "mmscale", "calls": 1,
                               "bytes": 2 * 256 * 64 * 4}]


def test_attention_flop_are_counted():
    """A ViT-B/16 forward comes within 2% of its analytic count: 2 x MACs of the patch embedding, and
    per block of N = 197 tokens and width d = 768 the qkv, projection and MLP matmuls (24 N d^2)
    and attention's QK^T and PV (4 N^2 d). torch's counter alone gave the CPU's attention 0 FLOP
    (4% low here, more for larger images)."""
    import timm
    import torch
    from mmscale.cli.bench.instruments import flop_counter
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    with flop_counter() as counted, torch.no_grad():
        vit(torch.randn(1, 3, 224, 224))
    n, d, layers = 197, 768, 12
    analytic = 2 * 196 * (3 * 16 * 16) * d + layers * (24 * n * d ** 2 + 4 * n ** 2 * d)
    print(f"ViT-B/16 forward: counted {counted.get_total_flops() / 1e9:.3f} GFLOP, analytic {analytic / 1e9:.3f}")
    assert counted.get_total_flops() == pytest.approx(analytic, rel=0.02)

"""The engine end to end: 2-rank runs through the real launcher, kill -9 and exact resume,
export that rebuilds offline, and the LR schedule."""
import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import PY, ROOT, free_port
from mmscale.engine.schedule import lr_lambda

TORCHRUN = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]


def launch(run_dir, *overrides, ranks=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if ranks == 1:
        cmd = [PY, "mmscale/train.py"]
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
               "mmscale/train.py"]
    cmd += ["recipes/tiny.yaml", f"train.run_dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def kill_tree(proc):
    """kill -9 the launcher and every worker, as a preemption does (torchrun's workers live in
    their own sessions, so killing the launcher's group alone leaves them running)."""
    import psutil
    parent = psutil.Process(proc.pid)
    for p in parent.children(recursive=True) + [parent]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def step_losses(run_dir):
    losses = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                losses[rec["step"]] = rec["loss"]  # a resumed run overwrites re-done steps
    return losses


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(warmup=4, total=14, schedule="cosine", min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


RUN = ["train.steps=24", "train.log_every=1", "train.checkpoint_every=2", "optim.warmup_steps=4"]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["digits", "shards"])
def test_kill_and_resume_continues_exactly(source, tmp_path):
    """kill -9 of a 2-rank run mid-epoch, then the same command: every later step sees the same
    batch as an uninterrupted run (equal losses step by step, equal final weights)."""
    run = list(RUN)
    if source == "shards":
        from test_data import write_digit_shards
        write_digit_shards(str(tmp_path / "shards"), per_shard=200, shards=4, corrupt={5, 300})
        run += ["data.type=shards", f"data.shards={tmp_path / 'shards'}"]
    ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
    ref = launch(ref_dir, *run)
    finish(ref)

    cut = launch(cut_dir, *run)
    latest = os.path.join(cut_dir, "checkpoints", "latest")
    deadline = time.time() + 240
    while not os.path.exists(latest) and time.time() < deadline and cut.poll() is None:
        time.sleep(0.02)
    kill_tree(cut)
    cut.wait()
    assert not os.path.exists(os.path.join(cut_dir, "results.json")), "the run finished before it was killed"
    killed_at = max(step_losses(cut_dir))
    assert killed_at < 24

    out = finish(launch(cut_dir, *run))
    ref_losses, cut_losses = step_losses(ref_dir), step_losses(cut_dir)
    resumed = [json.loads(l) for l in open(os.path.join(cut_dir, "metrics.jsonl")) if '"resumed"' in l]
    assert len(resumed) == 1 and 2 <= resumed[0]["step"] <= killed_at
    assert sorted(cut_losses) == sorted(ref_losses) == list(range(1, 25))
    for s in ref_losses:
        assert cut_losses[s] == pytest.approx(ref_losses[s], rel=1e-5, abs=1e-6), s
    a = load_file(os.path.join(ref_dir, "export", "model.safetensors"))
    b = load_file(os.path.join(cut_dir, "export", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # only complete checkpoints are kept, the newest named by `latest`
    ckpts = sorted(d for d in os.listdir(os.path.join(cut_dir, "checkpoints")) if d.startswith("step"))
    assert open(os.path.join(cut_dir, "checkpoints", "latest")).read() == ckpts[-1] == "step00000024"
    if source == "shards":  # 800 samples, 12 steps of 64 per epoch: the two corrupt ones are met
        skipped = [json.loads(l)["skipped_samples"] for l in open(os.path.join(ref_dir, "metrics.jsonl")) if '"loss"' in l]
        assert skipped[-1] >= 1 and skipped == sorted(skipped)


OPEN_CLIP_TINY = ("{model_cfg: {embed_dim: 32, vision_cfg: {image_size: 32, layers: 1, width: 64, head_width: 32, "
                  "patch_size: 8}, text_cfg: {context_length: 16, vocab_size: 49408, width: 64, heads: 2, layers: 1}}}")


@pytest.mark.slow
def test_open_clip_towers_train_on_two_ranks(tmp_path):
    """open_clip's towers under DeepSpeed ZeRO-2 on 2 ranks: the text half's unused 0-dim
    logit_scale used to stop DeepSpeed's start-up broadcast ("self.dim() cannot be 0")."""
    run_dir = str(tmp_path / "oc")
    finish(launch(run_dir, "model.image.source=open_clip", "model.image.name=tiny", f"model.image.kwargs={OPEN_CLIP_TINY}",
                  "model.text.source=open_clip", "model.text.name=tiny", f"model.text.config_overrides={OPEN_CLIP_TINY}",
                  "train.steps=3", "train.log_every=1", "train.zero_stage=2", "train.grad_cache_chunk=8"))
    losses = step_losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    from mmscale.export import load_export
    model = load_export(os.path.join(run_dir, "export"))
    assert all(p.dim() > 0 for p in model.parameters())


@pytest.mark.slow
def test_export_rebuilds_offline_and_reproduces_eval(tmp_path):
    """A one-process run with bf16, ZeRO-3, a learnable temperature and the gradient cache; the
    exported model, rebuilt from its folder alone, gives the run's own zero-shot numbers."""
    run_dir = str(tmp_path / "run")
    finish(launch(run_dir, "train.steps=6", "train.zero_stage=3", "train.precision=bf16",
                  "model.learn_temperature=true", ranks=1))
    results = json.load(open(os.path.join(run_dir, "results.json")))
    records = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [6]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)

    from mmscale.config import load_config
    from mmscale.export import load_export
    from mmscale.tasks import ClipTask
    model = load_export(os.path.join(run_dir, "export"))
    state = load_file(os.path.join(run_dir, "export", "model.safetensors"))
    assert "logit_scale.log_value" in state and state["logit_scale.log_value"].shape == (1,)
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    metrics = ClipTask(cfg).evaluate(model.to(torch.bfloat16), torch.device("cpu"), torch.bfloat16)
    assert metrics["zeroshot/top1"] == pytest.approx(results["zeroshot/top1"], abs=0.02)

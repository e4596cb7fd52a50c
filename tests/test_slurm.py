"""slurm/pretrain.sh on a real Slurm: Debian's slurmctld + slurmd + munge on this machine (CPU
only; two nodes sharing the host, two placeholder GPUs each). The tiny recipe on 2 ranks is
submitted with sbatch exactly as a user would: on 1 node x 2 GPUs, then on 2 nodes x 1 GPU with
two requeues in the middle of the run.

Opt-in, because it installs packages and runs daemons as root:
    MMSCALE_SLURM_TESTS=1 .venv/bin/python -m pytest -q tests/test_slurm.py
The cluster (slurm/local/start.sh) lives in a temporary folder on its own ports and is stopped
after the tests; the scripts' per-job logs go to slurm/logs/ and are removed after each test.
"""
import json
import os
import re
import subprocess
import time

import pytest

from helpers import events, records
from slurm_cluster import LOCAL, SlurmCluster, free_ports, latest, skip_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = str(tmp_path_factory.mktemp("slurm"))
    c = SlurmCluster(state)
    c.env["MMSCALE_SLURM_PORT"] = str(free_ports())
    c.env["MMSCALE_SLURM_NODES"] = "2"
    t0 = time.monotonic()
    p = subprocess.run(["bash", os.path.join(LOCAL, "install.sh")], text=True, capture_output=True, timeout=900)
    if p.returncode != 0:
        # the package registry, not the scripts under test: say so loudly and skip
        pytest.skip(f"could not install Debian's slurm packages: {(p.stderr or p.stdout).strip()[-500:]}")
    p = subprocess.run(["bash", os.path.join(LOCAL, "start.sh")], env=c.env, text=True, capture_output=True, timeout=900)
    print(f"\n[test_slurm] install + start: {time.monotonic() - t0:.0f}s\n{p.stdout}", end="")
    try:
        assert p.returncode == 0, f"slurm/local/start.sh failed:\n{p.stdout}\n{p.stderr}\n{c.diagnostics()}"
        yield c
    finally:
        subprocess.run(["bash", os.path.join(LOCAL, "stop.sh")], env=c.env, text=True, capture_output=True, timeout=300)


@pytest.fixture
def slurm(cluster):
    yield cluster
    for log in cluster.logs:
        if os.path.exists(log):
            os.remove(log)
    cluster.logs.clear()


TINY = ["recipes/tiny.yaml", "train.log_every=1", "optim.warmup_steps=4", "data.num_workers=2"]
ONE_NODE = ["--nodes=1", "--gpus-per-node=2", "--time=15"]  # 2 ranks, the paper's layout at 2 GPUs
TWO_NODES = ["--nodes=2", "--gpus-per-node=1", "--time=15"]  # 2 ranks, one per node


def test_sbatch_trains_checkpoints_and_logs(slurm, tmp_path):
    """sbatch slurm/pretrain.sh RECIPE overrides: 1 node x 2 ranks through srun + torchrun."""
    t0 = time.monotonic()
    run_dir = str(tmp_path / "run")
    job, log = slurm.sbatch(*ONE_NODE, "slurm/pretrain.sh", *TINY, "train.steps=12", "train.checkpoint_every=4",
                            f"train.run_dir={run_dir}")
    slurm.wait(job, lambda: slurm.job(job).get("JobState") == "COMPLETED", "completion", 300, log)
    diag = slurm.diagnostics(job, log)
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert steps == list(range(1, 13)), diag
    assert latest(run_dir) == "step00000012" and os.path.isdir(os.path.join(run_dir, "checkpoints", "step00000012")), diag
    with open(os.path.join(run_dir, "results.json")) as f:
        assert json.load(f)["step"] == 12
    assert os.path.isfile(log), f"no per-job log at {log}\n{diag}"
    text = open(log, errors="replace").read()
    assert "1 node(s) x 2 worker(s)" in text and "--nproc_per_node=2" in text, diag
    assert "training step exited with 0" in text and "finished:" in text, diag
    print(f"\n[test_slurm] sbatch run of 12 steps: {time.monotonic() - t0:.0f}s")


def test_bad_recipe_fails_before_launch(slurm, tmp_path):
    """slurm/finetune.sh (the same launcher) with an unknown key: the batch shell checks the
    recipe for the allocation's world size and fails at once, exit 2, without srun or a requeue."""
    job, log = slurm.sbatch("--gpus-per-node=1", "--cpus-per-task=2", "--time=5", "slurm/finetune.sh",
                            "recipes/tiny.yaml", "train.no_such_key=1", f"train.run_dir={tmp_path / 'run'}")
    slurm.wait(job, lambda: slurm.job(job).get("JobState") == "FAILED", "failure", 60, log)
    info, diag = slurm.job(job), slurm.diagnostics(job, log)
    assert info.get("ExitCode") == "2:0" and info.get("Restarts") == "0", diag
    text = open(log, errors="replace").read()
    assert "config error: train.no_such_key" in text and "srun " not in text, diag
    assert not os.path.exists(tmp_path / "run"), diag


def test_requeue_resumes_from_checkpoint(slurm, tmp_path):
    """2 nodes x 1 rank (torchrun's c10d rendezvous across nodes), interrupted twice, each time
    followed by a requeue and a resume:
    1. USR1 to the batch shell (what #SBATCH --signal=B:USR1@180 sends before the time limit):
       the script stops the step with SIGTERM, the ranks checkpoint at the same step and the
       script requeues the job itself;
    2. `scontrol requeue` (what preemption in REQUEUE mode or an operator does): Slurm sends
       SIGTERM, the ranks checkpoint within KillWait and Slurm requeues the job.
    The third attempt finishes the run; each logged step follows its predecessor or a resume."""
    t0 = time.monotonic()
    total = 30
    run_dir = str(tmp_path / "run")
    job, log = slurm.sbatch(*TWO_NODES, "slurm/pretrain.sh", *TINY, f"train.steps={total}", "train.checkpoint_every=5",
                            f"train.run_dir={run_dir}")

    def trained_after(step):
        return lambda: any("loss" in r and r["step"] > step for r in records(run_dir))

    # 1. the time-limit path
    slurm.wait(job, lambda: latest(run_dir) is not None, "a first checkpoint", 240, log)
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    slurm.wait(job, lambda: len(events(run_dir, "resumed")) == 1, "the requeued job's resume", 240, log)
    first = events(run_dir, "resumed")[0]["step"]
    slurm.wait(job, trained_after(first), "training after the first resume", 120, log)
    # 2. Slurm's own requeue
    slurm.run("scontrol", "requeue", job)
    slurm.wait(job, lambda: slurm.job(job).get("JobState") == "COMPLETED", "completion after two requeues", 360, log)
    print(f"\n[test_slurm] run of {total} steps with two requeues: {time.monotonic() - t0:.0f}s; events: "
          + ", ".join(f"{r['event']}@{r.get('step', '-')}" for r in records(run_dir) if "event" in r))

    diag = slurm.diagnostics(job, log)
    info = slurm.job(job)
    assert info.get("Restarts") == "2", diag
    preempted, resumed = events(run_dir, "preempted"), events(run_dir, "resumed")
    assert len(resumed) == 2, diag
    # the USR1 path always stops gracefully: checkpoint at the stop step, resume from exactly it
    assert preempted and preempted[0]["step"] == resumed[0]["step"] and preempted[0]["signal"] == 15, diag
    # Slurm's requeue: resumed from checkpoints/latest, wherever the SIGTERM let it be written
    assert resumed[0]["step"] <= resumed[1]["step"] < total, diag
    if len(preempted) == 2:
        assert preempted[1]["step"] == resumed[1]["step"], diag
    # every step trained and logged, continuous across both resumes (a hard stop may redo
    # the steps after the last checkpoint; each then continues from the resumed step)
    seq = [r for r in records(run_dir) if "loss" in r or r.get("event") == "resumed"]
    expected_next = 1
    for r in seq:
        if r.get("event") == "resumed":
            expected_next = r["step"] + 1
        else:
            assert r["step"] == expected_next, f"step {r['step']} after {expected_next - 1}\n{diag}"
            expected_next += 1
    assert expected_next == total + 1, diag
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in seq if "loss" in r), diag  # no NaN
    with open(os.path.join(run_dir, "results.json")) as f:
        assert json.load(f)["step"] == total
    assert latest(run_dir) == f"step{total:08d}", diag
    text = open(log, errors="replace").read()
    assert re.findall(r"attempt (\d+) on", text) == ["1", "2", "3"] and "2 node(s) x 1 worker(s)" in text, diag
    assert "got USR1" in text and "requeueing job" in text, diag
    assert text.count("resuming from") == 2, diag

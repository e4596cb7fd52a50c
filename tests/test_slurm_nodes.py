"""slurm/pretrain.sh on a Slurm whose two nodes are hosts of their own: tests/cluster.py's network
namespaces, each with its hostname (resolving to 127.0.0.1 on itself), its address and its slurmd;
slurmctld runs on node 1, which is also where sbatch is typed (the login node). The tiny recipe
on 2 nodes x 2 ranks is submitted as a user would, then node 2 is lost (kill -9 of its slurmd and
the job's processes there): the job is requeued, node 2 comes back, and the job resumes from
checkpoints/latest and finishes.

Opt-in with the other Slurm tests (root, Debian's slurm packages):
    MMSCALE_SLURM_TESTS=1 .venv/bin/python -m pytest -q tests/test_slurm_nodes.py
"""
import json
import os
import re
import subprocess
import time

import pytest

from cluster import Cluster
from cluster import skip_reason as namespaces_missing
from helpers import events, records
from slurm_cluster import LOCAL, SlurmCluster, latest, skip_reason

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
              pytest.mark.skipif(namespaces_missing() is not None, reason=str(namespaces_missing()))]


@pytest.fixture(scope="module")
def nodes():
    """Two namespaced nodes running slurmctld (node 1) and a slurmd each; munged on this host (its
    socket is a file of the shared file system)."""
    p = subprocess.run(["bash", os.path.join(LOCAL, "install.sh")], text=True, capture_output=True, timeout=900)
    if p.returncode != 0:
        pytest.skip(f"could not install Debian's slurm packages: {(p.stderr or p.stdout).strip()[-500:]}")
    cluster = Cluster(2).start()
    slurm = SlurmCluster(os.path.join(cluster.shared, "slurm"),
                         login=["nsenter", f"--net=/run/netns/{cluster.nodes[0].ns}", "--"])
    slurm.env.update(MMSCALE_SLURM_DAEMONS="0", MMSCALE_SLURM_GPUS="2",
                     MMSCALE_SLURM_NODE_ADDRS=" ".join(f"{n.name}={n.addr}" for n in cluster.nodes))
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        slurm.env.pop(key, None)
    conf = slurm.env["SLURM_CONF"]
    try:
        p = subprocess.run(["bash", os.path.join(LOCAL, "start.sh")], env=slurm.env, text=True, capture_output=True,
                           timeout=300)
        assert p.returncode == 0, f"slurm/local/start.sh failed:\n{p.stdout}\n{p.stderr}"
        log = os.path.join(slurm.state, "log")
        cluster.popen(cluster.nodes[0], ["/usr/sbin/slurmctld", "-D", "-c", "-f", conf], env=slurm.env,
                      log=os.path.join(log, "slurmctld.out"))
        slurm.start_slurmd = lambda node: cluster.popen(node, ["/usr/sbin/slurmd", "-D", "-N", node.name, "-f", conf],
                                                        env=slurm.env, log=os.path.join(log, f"{node.name}.out"))
        for node in cluster.nodes:
            slurm.start_slurmd(node)
        wait_for_nodes(slurm, "idle", 2)
        slurm.cluster = cluster
        yield slurm
    finally:
        cluster.stop()
        for log in slurm.logs:  # the per-job logs in slurm/logs/
            if os.path.exists(log):
                os.remove(log)
        subprocess.run(["bash", os.path.join(LOCAL, "stop.sh")], env=slurm.env, capture_output=True, timeout=120)


def wait_for_nodes(slurm, state, count, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = slurm.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        if sum(line.split()[1].startswith(state) for line in out.splitlines() if len(line.split()) == 2) >= count:
            return
        time.sleep(1)
    pytest.fail(f"{count} nodes not {state} within {timeout}s\n{slurm.diagnostics()}")


def test_two_nodes_train_and_a_lost_node_ends_in_a_requeue_that_resumes(nodes):
    slurm, cluster = nodes, nodes.cluster
    total, run_dir = 40, os.path.join(cluster.shared, "run")
    job, log = slurm.sbatch("--nodes=2", "--gpus-per-node=2", "--time=15", "slurm/pretrain.sh", "recipes/tiny.yaml",
                            "train.log_every=1", f"train.steps={total}", "train.checkpoint_every=4",
                            "train.dist_timeout_s=10", "eval.zeroshot=false", f"train.run_dir={run_dir}")

    def trained_past_latest():
        step = int((latest(run_dir) or "step0").removeprefix("step"))
        return step >= 4 and any("loss" in r and r["step"] > step for r in records(run_dir))

    slurm.wait(job, trained_past_latest, "a checkpoint and a step after it", 600, log)
    cluster.nodes[1].kill()  # node 2's slurmd, slurmstepd, torchrun and ranks
    slurm.wait(job, lambda: "requeueing job" in open(log, errors="replace").read(), "the requeue", 300, log)
    slurm.start_slurmd(cluster.nodes[1])  # node 2 comes back (after a reboot, say)
    slurm.wait(job, lambda: slurm.job(job).get("JobState") == "COMPLETED", "completion after the requeue", 900, log)

    diag = slurm.diagnostics(job, log)
    text = open(log, errors="replace").read()
    assert "2 node(s) x 2 worker(s)" in text and "it was lost" in text, diag
    assert re.search(r"ranks 2, 3 \(on node2\) stopped answering", text), diag
    resumed = events(run_dir, "resumed")
    assert resumed and resumed[-1]["step"] >= 4, diag
    steps = sorted({r["step"] for r in records(run_dir) if "loss" in r})
    assert steps == list(range(1, total + 1)), diag
    with open(os.path.join(run_dir, "results.json")) as f:
        assert json.load(f)["step"] == total
    # both nodes chose their veth for gloo, none the loopback their hostname resolves to
    assert len(re.findall(r"node[12]: gloo sockets on eth0", text)) >= 2, diag

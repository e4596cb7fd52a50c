"""A private Slurm for the opt-in Slurm tests (test_slurm.py, test_slurm_nodes.py): whether this
machine can run one, and a client of it (sbatch, job states, waits that fail with the daemons'
and the job's logs)."""
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from conftest import ROOT

LOCAL = os.path.join(ROOT, "slurm", "local")


def skip_reason():
    if os.environ.get("MMSCALE_SLURM_TESTS") != "1":
        return "opt-in: MMSCALE_SLURM_TESTS=1 (installs Debian's slurm packages, runs slurmctld/slurmd/munged as root)"
    if os.geteuid() != 0:
        return "needs root (apt-get install, slurm and munge daemons)"
    if not shutil.which("apt-get") and not shutil.which("slurmctld") and not os.path.exists("/usr/sbin/slurmctld"):
        return "needs apt-get (Debian/Ubuntu) or slurm already installed"
    return None


def free_ports(n=3, start=16817):
    """n consecutive free ports (slurmctld, one per slurmd) near Slurm's usual ones."""
    for base in range(start, start + 400, 10):
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports for slurmctld/slurmd")


class SlurmCluster:
    """A private Slurm (slurm/local/) to submit to: its environment, sbatch, job states, waits that
    fail with the daemons' and the job's logs."""

    def __init__(self, state, login=()):
        self.state = state
        self.login = list(login)  # a prefix that runs a client command where slurmctld is reachable
        self.env = {**os.environ, "MMSCALE_SLURM_DIR": state, "SLURM_CONF": os.path.join(state, "etc", "slurm.conf"),
                    "MMSCALE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
        self.logs = []  # per-job logs written by the scripts, removed after each test

    def run(self, *cmd, check=True, timeout=60):
        p = subprocess.run(self.login + list(cmd), cwd=ROOT, env=self.env, text=True, capture_output=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}\n{self.diagnostics()}")
        return p.stdout

    def sbatch(self, *args):
        """Submit slurm/pretrain.sh from the repository root; returns (job id, its log path)."""
        name = f"mmscale-test-{uuid.uuid4().hex[:8]}"
        out = self.run("sbatch", "--parsable", f"--job-name={name}", *args)
        job = out.strip().split(";")[0]
        log = os.path.join(ROOT, "slurm", "logs", f"{name}-{job}.out")
        self.logs.append(log)
        return job, log

    def job(self, job):
        out = self.run("scontrol", "show", "job", "-o", job, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job, done, what, timeout, log=None, poll=0.5):
        """Poll until done() is true; on timeout fail with the cluster's and the job's logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done():
                return
            info = self.job(job)
            if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                                        "DEADLINE") or "held" in info.get("Reason", ""):
                break
            time.sleep(poll)
        pytest.fail(f"job {job}: {what} did not happen within {timeout}s\n{self.diagnostics(job, log)}")

    def diagnostics(self, job=None, log=None):
        parts = []
        for cmd in [["squeue"], ["sinfo"]] + ([["scontrol", "show", "job", job]] if job else []):
            p = subprocess.run(self.login + cmd, env=self.env, text=True, capture_output=True)
            parts.append(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}")
        daemon_logs = sorted(glob.glob(os.path.join(self.state, "log", "*.log")))  # slurmctld, slurmd-NODE, munged
        for path in daemon_logs + ([log] if log else []):
            parts.append(f"--- {path} (tail)\n{tail(path, 60)}")
        return "\n".join(parts)


def tail(path, n):
    try:
        with open(path, errors="replace") as f:
            return "\n".join(f.read().replace("\r", "\n").splitlines()[-n:])
    except OSError as e:
        return f"({e})"


def latest(run_dir):
    try:
        with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
            return f.read().strip()
    except OSError:
        return None

"""Runs one step of tools/gpu_check.sh: a command under a wall-clock limit, after which no process
the step started is left.

    python tools/gpu_step.py LIMIT_S COMMAND [ARG...]

timeout(1) kills the command's process group, which misses what the command starts in a session or
group of its own: the tests' training launches (tests/helpers.py), torchrun's workers, anything
that daemonizes. So this runner makes itself the step's child subreaper (Linux prctl
PR_SET_CHILD_SUBREAPER): every process below it, including one whose parent died first, stays
below it. At the limit all of them get SIGKILL (no grace: a SIGTERM would have a training run
checkpoint into the next step's time) and the exit code is 124, as timeout(1)'s; when the command
ends first, whatever it left running is killed too and named on stderr. The step's temporary files
go with it: the command runs with TMPDIR set to a folder of its own (pytest's tmp_path, the bench's
run folders, pip's build folders), removed after. Exit: the command's code (128 + N for a signal
N), 124 when it ran out of time.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed: gpu_step.py needs Linux")


def descendants() -> dict[int, str]:
    """{pid: command line} of every live process below this one, read from /proc (zombies left out)."""
    parent, cmdline = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # ended while being read
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]  # the name in (...) may hold spaces
        if state != "Z":
            parent[int(entry)] = int(ppid)
    me, found = os.getpid(), {}
    for pid in parent:
        if pid == me:
            continue
        p = pid
        while p in parent and p not in found and p != me:
            p = parent[p]
        if p == me or p in found:
            found[pid] = cmdline.get(pid, "?")
    return found


def reap() -> None:
    """Collects the exit status of every ended child (orphans re-parented here included)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def kill_all() -> dict[int, str]:
    """SIGKILL every process below this one until none is left; {pid: command line} of those killed."""
    killed: dict[int, str] = {}
    for _ in range(200):  # a process forking while we kill shows up in the next round
        alive = descendants()
        if not alive:
            break
        for pid, cmd in alive.items():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.setdefault(pid, cmd)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
        reap()
    reap()
    return killed


def run(limit: float, command: list[str]) -> int:
    become_subreaper()
    tmp = tempfile.mkdtemp(prefix="gpu-step-")
    try:
        return _run(limit, command, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(limit: float, command: list[str], tmp: str) -> int:
    def on_signal(signum, frame):  # the whole check interrupted: the step's processes go with it
        kill_all()
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    try:
        proc = subprocess.Popen(command, env={**os.environ, "TMPDIR": tmp})
    except OSError as e:
        print(f"gpu_step: cannot start {command[0]}: {e}", file=sys.stderr)
        return 127
    try:
        rc = proc.wait(timeout=limit)
        rc = 128 - rc if rc < 0 else rc
        left = kill_all()
        if left:
            print(f"gpu_step: the command left {len(left)} process(es) running, killed: "
                  + "; ".join(f"{pid} {cmd[:120]}" for pid, cmd in sorted(left.items())), file=sys.stderr)
    except subprocess.TimeoutExpired:
        killed = kill_all()
        proc.wait()
        print(f"gpu_step: {limit:g} s limit reached: killed the step's {len(killed)} process(es)", file=sys.stderr)
        rc = 124
    return rc


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: gpu_step.py LIMIT_S COMMAND [ARG...]", file=sys.stderr)
        return 2
    return run(float(argv[0]), argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""A cluster of N nodes on one machine, for the multi-host tests.

Each node is a Linux network namespace with one veth interface, `eth0`, on a private /24
subnet; a switch namespace bridges the nodes' veth peers, so nodes reach each other and nothing
else (the root namespace has no address on that subnet and no route into it). A process started
on a node also gets a UTS namespace whose hostname is the node's name, an /etc/hosts in which
that name resolves to 127.0.0.1 (the Debian and container default that breaks gloo's address
choice; the other nodes' names resolve to their addresses, as cluster DNS gives them) and a
private /tmp (a mount namespace with its own tmpfs). What the nodes share is the file system
outside /tmp, `cluster.shared` (the run folders' shared file system) and the folder a command
runs in (the repository and its .venv, even in a clone under /tmp).

Needs root and iproute2/util-linux (`ip`, `unshare`); `skip_reason()` says in one line why a test
cannot run. Everything started on a node is killed, and the namespaces deleted, by `stop()` (the
`cluster` fixture in test_multinode.py calls it whatever happened).
"""
from __future__ import annotations

import functools
import ipaddress
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

PREFIX = "mms"  # namespace names: mms<id>-n1, mms<id>-n2, ..., mms<id>-sw


def _run(*cmd, check=True):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {p.returncode}: {p.stderr.strip()}")
    return p.stdout


@functools.lru_cache(maxsize=None)  # one probe per test session
def skip_reason() -> str | None:
    """None when this machine can make namespaced nodes, else one line saying what is missing."""
    if os.geteuid() != 0:
        return "the simulated cluster needs root (network, UTS and mount namespaces)"
    for tool in ("ip", "unshare", "nsenter", "mount", "hostname"):
        if not shutil.which(tool):
            return f"the simulated cluster needs `{tool}` (iproute2/util-linux; tools/setup.sh installs them as root)"
    name = f"{PREFIX}probe{os.getpid()}"
    try:
        _run("ip", "netns", "add", name)
        _run("ip", "link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b")
        _run("ip", "link", "del", f"{name}a")
        _run("unshare", "--uts", "--mount", "--propagation", "private", "--", "nsenter", f"--net=/run/netns/{name}",
             "--", "true")
    except (RuntimeError, OSError) as e:
        return f"cannot make network namespaces with veth pairs here ({e})"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that no address or route of the root namespace or another namespace uses."""
    used = _run("ip", "-o", "addr") + _run("ip", "route")
    for ns in _run("ip", "netns", "list").split():
        used += subprocess.run(["ip", "-n", ns, "-o", "addr"], capture_output=True, text=True).stdout
    taken = [ipaddress.ip_network(w, strict=False) for w in used.split() if "/" in w and w[0].isdigit()
             and ":" not in w]
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{rng.randrange(100, 250)}.{rng.randrange(0, 255)}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet for the simulated cluster")


def reap_stale() -> None:
    """The namespaces and folders of clusters whose test process is gone (killed before its
    teardown): their processes killed, their namespaces deleted."""
    import glob
    for folder in glob.glob("/var/tmp/mmscale-cluster-*"):
        try:
            with open(os.path.join(folder, "owner.pid")) as f:
                os.kill(int(f.read()), 0)
            continue  # its owner is alive
        except FileNotFoundError:
            if time.time() - os.path.getmtime(folder) < 3600:
                continue  # being made right now
        except (OSError, ValueError):
            pass
        cid = os.path.basename(folder).split("-")[2]
        for ns in _run("ip", "netns", "list", check=False).split():
            if ns.startswith(f"{PREFIX}{cid}-"):
                for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


class Node:
    def __init__(self, index: int, ns: str, addr: str, hosts: str):
        self.index, self.ns, self.addr, self.hosts = index, ns, addr, hosts
        self.name = f"node{index}"

    def pids(self) -> list[int]:
        """Every process in the node's network namespace (what a lost node takes down)."""
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill(self) -> None:
        """kill -9 every process of the node, as a power loss would; returns once none is left."""
        for _ in range(100):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: processes {self.pids()} survive kill -9")


class Cluster:
    def __init__(self, nodes: int = 2):
        self.id = uuid.uuid4().hex[:6]
        self.net = _free_subnet()
        hosts = list(self.net.hosts())
        # the shared file system: not under /tmp, which every node has its own of
        self.shared = tempfile.mkdtemp(prefix=f"mmscale-cluster-{self.id}-", dir="/var/tmp")
        self.keep_mount = os.path.join(self.shared, ".keep")  # a mount point, inside a node's namespace only
        os.makedirs(self.keep_mount)
        os.chmod(self.shared, 0o755)  # munged wants every folder above its socket searchable
        with open(os.path.join(self.shared, "owner.pid"), "w") as f:  # see reap_stale
            f.write(str(os.getpid()))
        self.switch = f"{PREFIX}{self.id}-sw"
        self.nodes = [Node(i, f"{PREFIX}{self.id}-n{i}", str(hosts[i - 1]), os.path.join(self.shared, f".hosts{i}"))
                      for i in range(1, nodes + 1)]
        self.procs: list[subprocess.Popen] = []

    def start(self) -> "Cluster":
        reap_stale()
        try:
            _run("ip", "netns", "add", self.switch)
            _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.switch, "link", "set", "br0", "up")
            for node in self.nodes:
                _run("ip", "netns", "add", node.ns)
                peer = f"{PREFIX}{self.id}p{node.index}"
                _run("ip", "link", "add", peer, "type", "veth", "peer", "name", f"{PREFIX}{self.id}e{node.index}")
                _run("ip", "link", "set", peer, "netns", self.switch)
                _run("ip", "link", "set", f"{PREFIX}{self.id}e{node.index}", "netns", node.ns)
                _run("ip", "-n", node.ns, "link", "set", f"{PREFIX}{self.id}e{node.index}", "name", "eth0")
                _run("ip", "-n", self.switch, "link", "set", peer, "master", "br0")
                _run("ip", "-n", self.switch, "link", "set", peer, "up")
                _run("ip", "-n", node.ns, "addr", "add", f"{node.addr}/{self.net.prefixlen}", "dev", "eth0")
                _run("ip", "-n", node.ns, "link", "set", "eth0", "up")
                _run("ip", "-n", node.ns, "link", "set", "lo", "up")
                lines = ["127.0.0.1 localhost", f"127.0.0.1 {node.name}"]
                lines += [f"{other.addr} {other.name}" for other in self.nodes if other is not node]
                with open(node.hosts, "w") as f:
                    f.write("\n".join(lines) + "\n")
        except BaseException:
            self.stop()
            raise
        return self

    def popen(self, node: Node, cmd: list[str], env: dict | None = None, cwd: str | None = None,
              log: str | None = None) -> subprocess.Popen:
        """cmd on the node (own hostname, /etc/hosts, /tmp), in a session of its own; its output
        goes to `log` (a file) or is captured (stdout and stderr together)."""
        # a working folder under /tmp (a clone in /tmp/x/mmscale, its .venv) would vanish under the
        # node's own /tmp: it is bound aside ($2) before the tmpfs is mounted, and back after
        keep = os.path.realpath(cwd) if cwd and os.path.realpath(cwd).startswith("/tmp/") else ""
        setup = ('hostname "$0" && mount --bind "$1" /etc/hosts '
                 '&& { [ -z "$3" ] || mount --bind "$3" "$2"; } '
                 '&& mount -t tmpfs -o size=2g tmpfs /tmp '
                 '&& { [ -z "$3" ] || { mkdir -p "$3" && mount --bind "$2" "$3" && umount "$2"; }; } '
                 '&& shift 3 && exec "$@"')
        # nsenter --net rather than `ip netns exec`, which remounts /sys and so hides /sys/fs/cgroup
        # (slurmd stops without it)
        full = ["unshare", "--uts", "--mount", "--propagation", "private", "--",
                "nsenter", f"--net=/run/netns/{node.ns}", "--", "sh", "-c", setup, node.name, node.hosts,
                self.keep_mount, keep, *cmd]
        out = open(log, "w") if log else subprocess.PIPE
        proc = subprocess.Popen(full, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        if log:
            out.close()
        self.procs.append(proc)
        return proc

    def run(self, node: Node, cmd: list[str], timeout: float = 60, **kwargs) -> str:
        proc = self.popen(node, cmd, **kwargs)
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{node.name}: {' '.join(cmd)} -> {proc.returncode}: {out}")
        return out

    def stop(self) -> None:
        """Kill everything the nodes run, delete the namespaces and the shared folder."""
        for node in self.nodes:
            try:
                node.kill()
            except RuntimeError:
                pass
        for proc in self.procs:
            try:
                proc.kill()
                proc.communicate(timeout=10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        for ns in [n.ns for n in self.nodes] + [self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.shared, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""Where this process sits in the job, before any process group exists: its rank variables (from
torchrun, deepspeed or a bare srun), the device it drives, and the network interface gloo binds to.

Nothing here talks to another rank; dist.py's init_distributed applies it all before it joins
the process group.

Why the interface is chosen here: gloo (the CPU backend, and the side group of the stop signals
under NCCL) binds to the address the machine's own hostname resolves to, and tells its peers to
connect there. Where the hostname resolves to 127.0.0.1 (the default of many Debian and container
images) every peer on another host is told to connect to its own loopback and the start stops
with "Gloo connectFullMesh failed ... remote=[127.0.0.1]". The interface the kernel routes
MASTER_ADDR through is the one the other hosts reach this host on, so gloo is bound to it.
NCCL's own groups keep NCCL's choice (it never resolves the hostname; it skips lo and docker*
and prefers InfiniBand): NCCL_SOCKET_IFNAME stays the user's.
"""
from __future__ import annotations

import ipaddress
import os
import socket

# an address of TEST-NET-2 (RFC 5737): routing it tells the default route's interface; connect()
# on a UDP socket only looks the route up, nothing is sent
DEFAULT_ROUTE_PROBE = "198.51.100.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(env=os.environ) -> dict:
    """What the process group needs from the launcher, as torchrun/deepspeed set it (RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Under a bare `srun` (SLURM_NTASKS tasks, no
    torchrun) these come from SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS, the port from the job id
    (every task computes the same one); a plain `python` run is one rank on this host."""
    if "RANK" in env:
        return {}
    # SLURM_STEP_NUM_TASKS exists only inside an srun step: a batch script's own `python` (where
    # SLURM_PROCID=0 and SLURM_NTASKS are set too) stays a one-rank run instead of waiting for peers
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if ntasks > 1 and "SLURM_PROCID" in env:
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if nodes == 1 else None)
        if addr is None:
            raise RuntimeError(
                f"srun started {ntasks} tasks on {nodes} nodes without torchrun: set MASTER_ADDR to the first "
                "node (export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)) or launch "
                "through slurm/pretrain.sh")
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
        return {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
                "WORLD_SIZE": str(ntasks), "LOCAL_WORLD_SIZE": str(max(1, ntasks // nodes)),
                "MASTER_ADDR": addr, "MASTER_PORT": port}
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT", str(_free_port()))}


# ---------------------------------------------------------------- the device

def device_index(local_rank: int, visible: int) -> int:
    """The accelerator this rank drives, among the `visible` ones it sees.

    torchrun and deepspeed show every rank all the node's devices, and LOCAL_RANK picks one. A
    bare `srun --gpus-per-task=1` (or `--gpu-bind=single:1`) shows each task only its own device,
    as index 0, while LOCAL_RANK (from SLURM_LOCALID) still counts the node's tasks: then the only
    device it sees is its own."""
    if visible < 1:
        raise RuntimeError("no accelerator is visible to this process (CUDA_VISIBLE_DEVICES, the job's GPU "
                           "request): ask for one GPU per rank")
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise RuntimeError(f"local rank {local_rank} sees {visible} devices: each rank needs one device of its own; "
                       f"launch one process per device (torchrun --nproc_per_node {visible}, or srun "
                       f"--gpus-per-task=1)")


# ---------------------------------------------------------------- the network interface

def _interfaces() -> dict[str, list[str]]:
    """{interface name: its addresses} of the interfaces that are up."""
    import psutil
    stats = psutil.net_if_stats()
    return {name: [a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
            for name, addrs in psutil.net_if_addrs().items() if stats.get(name) and stats[name].isup}


def route_source(addr: str) -> str | None:
    """The local address the kernel sends packets to `addr` from (None: no route, or a name that
    does not resolve)."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(addr, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)  # UDP: picks the route, sends nothing
            return s.getsockname()[0]
    except OSError:
        return None


def _owner(address: str, interfaces: dict[str, list[str]]) -> str | None:
    return next((name for name, addrs in interfaces.items() if address in addrs), None)


def choose_interface(master_addr: str, multi_host: bool | None, interfaces: dict[str, list[str]],
                     route=route_source) -> tuple[str, str] | None:
    """(interface, why) for gloo's sockets, or None to leave gloo to its own choice.

    The interface that routes to MASTER_ADDR. Where that is the loopback although MASTER_ADDR is
    not a loopback address (it names this host, whose name resolves to 127.0.0.1 here) and ranks
    run on other hosts too, they reach this host on another interface: the default route's, else
    the only one besides the loopback. multi_host None: the launcher did not say (no
    LOCAL_WORLD_SIZE); then an unclear case is left to gloo instead of stopping the run."""
    source = route(master_addr)
    name = _owner(source, interfaces) if source else None
    if name is None:
        return None
    if not is_loopback_literal(source) or multi_host is False or master_addr == "localhost" \
            or is_loopback_literal(master_addr):
        return name, f"the interface that routes to MASTER_ADDR={master_addr}"
    here = f"MASTER_ADDR={master_addr} is this host (loopback here)"
    default = route(DEFAULT_ROUTE_PROBE)
    if default and not is_loopback_literal(default) and (owner := _owner(default, interfaces)):
        return owner, f"{here}; the default route's interface"
    others = [n for n, addrs in interfaces.items() if any(not is_loopback_literal(a) for a in addrs)]
    if len(others) == 1:
        return others[0], f"{here}; its only other interface"
    if multi_host is None:
        return None
    raise RuntimeError(f"MASTER_ADDR={master_addr} resolves to this host's loopback, ranks run on other hosts too, "
                       f"and this host has no default route and {len(others)} other interfaces "
                       f"({', '.join(sorted(others)) or 'none'}): set GLOO_SOCKET_IFNAME to the one the other hosts "
                       f"reach it on")


def is_loopback_literal(addr: str) -> bool:
    """127.x.y.z or ::1 written as such (not a name that resolves to it)."""
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def socket_interface(env=os.environ, interfaces=None, route=route_source) -> tuple[dict, str | None]:
    """(variables to set, a start-up line or None: a line only where ranks span hosts). A user's GLOO_SOCKET_IFNAME always wins; a
    user's NCCL_SOCKET_IFNAME that names this host's interfaces exactly is followed by gloo too
    (prefix forms like `eth` or `^docker` are NCCL's alone: gloo is then left to choose)."""
    if env.get("GLOO_SOCKET_IFNAME") or int(env.get("WORLD_SIZE", "1")) == 1:
        return {}, None
    interfaces = _interfaces() if interfaces is None else interfaces
    nccl = env.get("NCCL_SOCKET_IFNAME", "")
    if nccl:
        names = nccl.removeprefix("=").split(",")
        if all(n in interfaces for n in names):
            return {"GLOO_SOCKET_IFNAME": ",".join(names)}, f"gloo sockets on {','.join(names)}, as NCCL_SOCKET_IFNAME"
        return {}, None
    master = env.get("MASTER_ADDR")
    if not master:
        return {}, None
    world, local = int(env.get("WORLD_SIZE", "1")), env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE")
    multi_host = world > int(local) if local else (None if world > 1 else False)
    chosen = choose_interface(master, multi_host, interfaces, route)
    if chosen is None:
        return {}, None
    name, why = chosen
    if multi_host is False:  # one host: set, but not worth a line in every single-host log
        return {"GLOO_SOCKET_IFNAME": name}, None
    addrs = ", ".join(interfaces[name][:1])
    return {"GLOO_SOCKET_IFNAME": name}, (f"gloo sockets on {name} ({addrs}), {why} (set GLOO_SOCKET_IFNAME "
                                          f"to choose another)")

"""Where a process sits before its process group exists (mmscale/placement.py): its rank
variables under a bare srun, the device it drives, and the interface gloo binds to. The real
multi-host case runs in test_multinode.py; these cases cover the decisions on every layout."""
import pytest

from mmscale.placement import choose_interface, device_index, launcher_env, socket_interface

# a host with a loopback, an Ethernet and an InfiniBand interface
IFACES = {"lo": ["127.0.0.1", "::1"], "eth0": ["10.0.0.5"], "ib0": ["192.168.7.5"]}


def routes(table):
    """A route lookup from {destination: source address} (None: no route)."""
    return lambda addr: table.get(addr)


def test_srun_without_a_launcher_maps_slurm_variables():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_ID": "12345", "MASTER_ADDR": "node0"}
    got = launcher_env(env)
    assert got == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "node0", "MASTER_PORT": str(20000 + 12345 % 20000)}
    one_node = launcher_env({**env, "SLURM_STEP_NUM_NODES": "1", "MASTER_ADDR": ""})
    assert one_node["MASTER_ADDR"] == "127.0.0.1"
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):  # several nodes, nobody named rank 0's host
        launcher_env({k: v for k, v in env.items() if k != "MASTER_ADDR"})
    assert launcher_env({**env, "RANK": "0"}) == {}  # torchrun/deepspeed already set it
    single = launcher_env({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"})
    assert single["WORLD_SIZE"] == "1" and single["RANK"] == "0"
    # a batch script's own python: SLURM_PROCID=0 and SLURM_NTASKS=8, but no srun step
    batch = launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"})
    assert batch["WORLD_SIZE"] == "1"



def test_a_rank_drives_the_device_its_launcher_gives_it():
    assert device_index(3, 8) == 3  # torchrun/deepspeed: every device visible, LOCAL_RANK picks
    assert device_index(3, 1) == 0  # bare srun --gpus-per-task=1: local task 3 sees only its own
    assert device_index(0, 1) == 0
    with pytest.raises(RuntimeError, match="local rank 3 sees 2 devices"):
        device_index(3, 2)
    with pytest.raises(RuntimeError, match="no accelerator is visible"):
        device_index(0, 0)


def test_gloo_binds_to_the_interface_that_routes_to_the_master():
    route = routes({"10.0.0.1": "10.0.0.5", "127.0.0.1": "127.0.0.1", "198.51.100.1": "10.0.0.5"})
    assert choose_interface("10.0.0.1", True, IFACES, route)[0] == "eth0"
    # one host: the loopback is right, and so it is where MASTER_ADDR says loopback itself
    assert choose_interface("127.0.0.1", False, IFACES, route)[0] == "lo"
    assert choose_interface("127.0.0.1", True, IFACES, route)[0] == "lo"
    # unknown address, or nothing owns the source: gloo keeps its own choice
    assert choose_interface("10.9.9.9", True, IFACES, route) is None


def test_a_master_named_after_this_host_resolving_to_loopback():
    """MASTER_ADDR=node1 on node1, whose /etc/hosts maps node1 to 127.0.0.1: the other hosts
    reach it on another interface, the default route's, else the only other one."""
    to_self = {"node1": "127.0.0.1"}
    with_default = routes({**to_self, "198.51.100.1": "192.168.7.5"})
    name, why = choose_interface("node1", True, IFACES, with_default)
    assert name == "ib0" and "default route" in why
    one_other = {"lo": IFACES["lo"], "eth0": IFACES["eth0"]}
    assert choose_interface("node1", True, one_other, routes(to_self))[0] == "eth0"
    with pytest.raises(RuntimeError, match=r"\(eth0, ib0\): set GLOO_SOCKET_IFNAME"):
        choose_interface("node1", True, IFACES, routes(to_self))
    assert choose_interface("node1", None, IFACES, routes(to_self)) is None  # launcher did not say: gloo decides
    assert choose_interface("node1", False, IFACES, routes(to_self))[0] == "lo"  # one host after all


def test_the_users_variables_win():
    route = routes({"10.0.0.1": "10.0.0.5"})
    env = {"MASTER_ADDR": "10.0.0.1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    chosen, line = socket_interface(env, IFACES, route)
    assert chosen == {"GLOO_SOCKET_IFNAME": "eth0"} and "eth0 (10.0.0.5)" in line and "MASTER_ADDR=10.0.0.1" in line
    assert socket_interface({**env, "GLOO_SOCKET_IFNAME": "ib0"}, IFACES, route) == ({}, None)
    # NCCL's variable, when it names interfaces exactly, is followed by gloo too; NCCL's prefix
    # forms mean nothing to gloo, which then chooses for itself
    assert socket_interface({**env, "NCCL_SOCKET_IFNAME": "=ib0"}, IFACES, route)[0] == {"GLOO_SOCKET_IFNAME": "ib0"}
    assert socket_interface({**env, "NCCL_SOCKET_IFNAME": "^docker,lo"}, IFACES, route) == ({}, None)
    assert socket_interface({**env, "WORLD_SIZE": "1"}, IFACES, route) == ({}, None)  # no peers
    # the deepspeed launcher says LOCAL_SIZE where torchrun says LOCAL_WORLD_SIZE
    ds = {"MASTER_ADDR": "node1", "WORLD_SIZE": "4", "LOCAL_SIZE": "4"}
    assert socket_interface(ds, IFACES, routes({"node1": "127.0.0.1"}))[0] == {"GLOO_SOCKET_IFNAME": "lo"}


def test_one_host_sets_the_interface_without_a_line():
    """Single-host logs stay as they were: the loopback is set for gloo, no start-up line."""
    env = {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert socket_interface(env, IFACES, routes({"127.0.0.1": "127.0.0.1"})) == ({"GLOO_SOCKET_IFNAME": "lo"}, None)


def test_the_watchdog_names_ranks_lost_together_and_their_host(monkeypatch):
    """Ranks of one lost node stop beating up to a beat apart: the line names every one of them
    and their host, not only the first past the limit; a rank still beating is not named; ranks
    on this host are named without it."""
    import socket as socket_module
    import time
    from mmscale.engine.watchdog import RankWatchdog
    dog = RankWatchdog(rank=0, world=5, timeout_s=10)  # a beat a second
    lines = []
    monkeypatch.setattr(dog, "_lost", lines.append)
    now = time.monotonic()
    dog.store_ok = now
    dog.last = {1: (5, now), 2: (5, now - 10.5), 3: (5, now - 9.6), 4: (5, now - 1.2)}
    dog.hosts = {1: "node1", 2: "node2", 3: "node2", 4: "node1"}
    monkeypatch.setattr(dog._stop, "wait", lambda _: bool(lines))  # one round of the watch loop
    dog._watch()
    assert len(lines) == 1 and lines[0].startswith("ranks 2, 3 (on node2) stopped answering"), lines
    monkeypatch.setattr(socket_module, "gethostname", lambda: "node2")
    assert dog.describe([2, 3]) == "ranks 2, 3" and dog.describe([1]) == "rank 1 (on node1)"

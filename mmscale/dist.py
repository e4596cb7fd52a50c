"""Everything that talks across ranks: process-group start-up, rank/world, gathers with and
without gradients, sharding rows over the ranks, broadcasts and any-rank flags.

Models never call this module; losses, evaluation, data caches and the engine do. All helpers
work unchanged in one process without a process group (world = 1).

Gradient convention (DeepSpeed and DDP average parameter gradients over the W ranks): a loss
computed on embeddings gathered with `all_gather_with_grad` sends each rank's rows the sum over
ranks of their gradients; after the 1/W average the parameters get exactly the gradient of one
process holding the whole batch. See mmscale/losses/ for the two ways the CLIP loss uses it.
"""
from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist

from .placement import device_index, launcher_env, socket_interface


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


NCCL_TIMEOUT_MARGIN_S = 60  # NCCL's own timeout sits this far above the heartbeat's (engine/watchdog.py)


def set_group_timeouts(timeout_s: float) -> datetime.timedelta:
    """The timeout of every process group created from now on, DeepSpeed's included.

    torch's new_group() without a timeout takes its module default (10 minutes for NCCL, 30 for
    gloo), not the default group's, and DeepSpeed creates its data-parallel groups that way; so
    the default is set where new_group reads it. NCCL's timeout is the heartbeat's plus a margin:
    a lost rank is then named by the watchdog (exit 69) before NCCL's own watchdog aborts."""
    from torch.distributed import distributed_c10d as c10d
    nccl = datetime.timedelta(seconds=timeout_s + NCCL_TIMEOUT_MARGIN_S)
    c10d.default_pg_timeout = datetime.timedelta(seconds=timeout_s)
    if c10d.default_pg_nccl_timeout is not None:
        c10d.default_pg_nccl_timeout = nccl
    return nccl


def init_distributed(timeout_s: float | None = None) -> None:
    """Join the process group the launcher (deepspeed, torchrun, srun) describes, or make a
    one-process group when run as plain `python`. timeout_s bounds every collective."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    if dist.is_initialized():
        return
    os.environ.update(launcher_env())
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(device_index(int(os.environ.get("LOCAL_RANK", 0)), acc.device_count()))
    chosen, line = socket_interface()
    os.environ.update(chosen)
    if line and os.environ.get("LOCAL_RANK", "0") == "0":  # one line per host
        print(f"mmscale: {socket.gethostname()}: {line}", file=sys.stderr, flush=True)
    if acc.device_name() == "cpu":
        # DeepSpeed's CPU backend compiles a shared-memory all-reduce for inference at its first
        # start (a minute of C++ on a fresh machine, CI's included); training never calls it
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    kwargs = {}
    if timeout_s:
        nccl = set_group_timeouts(timeout_s)
        kwargs["timeout"] = nccl if acc.communication_backend_name() == "nccl" else datetime.timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), **kwargs)


def init_simulated_world(world: int) -> None:
    """This process as rank 0 of `world` ranks over torch's fake process group, whose collectives
    return at once and move nothing (a gather's output keeps whatever memory held). For counting
    what one step of `world` ranks sends (mmscale-bench --simulate-ranks); never for training."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world)})
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())


def mirror_simulated_peers() -> None:
    """In a simulated world (init_simulated_world), from now on every process group answers an
    all-gather with this rank's tensor in every rank's place and a reduce-scatter with this rank's
    own slice, instead of the uninitialised memory the fake group leaves: the step's values stay
    finite, so DeepSpeed does not skip the step (and with it the step's later collectives)."""
    from torch.distributed import distributed_c10d as c10d

    def mirror(args):
        kind = args.name.name
        if kind == "ALLGATHER" and args.input_tensors:
            mine = args.input_tensors[0].reshape(-1)
            for out in args.output_tensors:  # one per rank, or one flat buffer of all ranks
                out.view(-1).copy_(mine.repeat(out.numel() // mine.numel()))
        elif kind == "REDUCE_SCATTER" and args.input_tensors:
            for out in args.output_tensors:
                out.view(-1).copy_(args.input_tensors[0].reshape(-1)[:out.numel()])
    groups = list(c10d._world.pg_map)
    for group in groups:
        group.register_pre_hook(0, mirror)
    # a Python hook still registered when the interpreter shuts down crashes it (SIGSEGV)
    atexit.register(lambda: [group.unregister_pre_hook(0) for group in groups])


def store_client(timeout_s: float):
    """A client of the launcher's rendezvous store (MASTER_ADDR:MASTER_PORT: the agent under
    torchrun, rank 0 under env:// launches) with its own short timeout, so a thread can use it
    while the main thread waits in a collective; None in one process."""
    if rank_and_world()[1] == 1 or "MASTER_ADDR" not in os.environ:
        return None
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def current_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def comm_device() -> torch.device:
    """Where the default group's tensors must be: the accelerator for NCCL (which rejects CPU
    tensors), the CPU for gloo. Every helper below moves its tensors here itself, so no caller can
    hand a collective a tensor on the wrong device."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() not in ("gloo", "mpi"):
        return current_device()
    return torch.device("cpu")


def _to_comm(t: torch.Tensor) -> torch.Tensor:
    return t.to(comm_device()).contiguous()


def _back(t: torch.Tensor, device) -> torch.Tensor:
    """A collective's result back where the caller's tensor was (a no-op when it was there)."""
    return t.to(device)


# ---------------------------------------------------------------- gathers that carry gradients

class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns the sum over ranks of the gradient for our rows.

    all_reduce + slice instead of reduce_scatter because gloo (CPU) has no reduce_scatter.
    Every rank must contribute the same number of rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The rows of every rank, in rank order; gradients flow back to this rank's rows. The result
    is on x's device (the moves are part of the graph: a no-op in training, where x is already on
    the communication device)."""
    if rank_and_world()[1] == 1:
        return x
    return _back(_AllGatherWithGrad.apply(_to_comm(x)), x.device)


def gather_outputs(out: dict, shared=()) -> dict:
    """This rank's per-sample outputs all-gathered (with gradients) into the global batch; the
    names in `shared` (one value for the whole batch, e.g. a logit scale) are kept as they are."""
    return {k: v if k in shared else all_gather_with_grad(v) for k, v in out.items()}


def global_index(local_index: torch.Tensor) -> torch.Tensor:
    """Gathered per-rank row indices (each rank's 0..n-1) -> indices into the gathered batch."""
    _, world = rank_and_world()
    n = local_index.shape[0] // world
    return local_index + torch.arange(local_index.shape[0], device=local_index.device) // n * n


# ---------------------------------------------------------------- ring passes that carry gradients

def _post_and_wait(sends: list, recvs: list) -> None:
    """Post every send (tensor, peer) and receive (buffer, peer) at once, then wait: two
    neighbours that send to each other in the same call cannot deadlock."""
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, b, peer) for b, peer in recvs]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


class _RingPass(torch.autograd.Function):
    """Tensor k moves one step round the ring in direction d_k (+1: to rank + 1, -1: to rank - 1)
    and this rank receives its neighbour's tensor k from the other side; in the backward each
    received tensor's gradient goes back to the rank that sent it."""

    @staticmethod
    def forward(ctx, directions, *xs):
        rank, world = rank_and_world()
        ctx.directions = directions
        received = [torch.empty_like(x) for x in xs]
        _post_and_wait([(x, (rank + d) % world) for x, d in zip(xs, directions)],
                       [(r, (rank - d) % world) for r, d in zip(received, directions)])
        return tuple(received)

    @staticmethod
    def backward(ctx, *grads):
        rank, world = rank_and_world()
        grads = [g.contiguous() for g in grads]
        back = [torch.empty_like(g) for g in grads]
        _post_and_wait([(g, (rank - d) % world) for g, d in zip(grads, ctx.directions)],
                       [(b, (rank + d) % world) for b, d in zip(back, ctx.directions)])
        return (None, *back)


def ring_pass_with_grad(xs: list[torch.Tensor], directions: list[int]) -> list[torch.Tensor]:
    """Each xs[k] sent one step round the ring in directions[k] (+1 or -1), and what this rank's
    neighbours sent the same way: [the tensor of rank - d_k for each k]; gradients flow back to the
    senders. On 2 ranks both neighbours are one rank, so only one direction may be used."""
    _, world = rank_and_world()
    if world == 2 and len(set(directions)) > 1:
        raise ValueError("ring_pass_with_grad: on 2 ranks left and right are one rank; pass one direction")
    device = xs[0].device
    received = _RingPass.apply(tuple(directions), *[_to_comm(x) for x in xs])
    return [_back(r, device) for r in received]


def ring_pass(x: torch.Tensor) -> torch.Tensor:
    """x sent to rank + 1, and rank - 1's x in return, without autograd (the ring losses move
    their blocks, and the blocks' gradients, themselves). Every rank's x has the same shape."""
    rank, world = rank_and_world()
    if world == 1:
        return x
    sent = _to_comm(x)
    received = torch.empty_like(sent)
    _post_and_wait([(sent, (rank + 1) % world)], [(received, (rank - 1) % world)])
    return _back(received, x.device)


def other_ranks_blocks(x: torch.Tensor):
    """Every other rank's x, one block at a time, with gradients (SigLIP's "bidir" exchange):
    round k receives the blocks of ranks r - k and r + k from the two neighbours at once, passing
    on what arrived in round k - 1, so W - 1 blocks take ceil((W - 1) / 2) rounds; an even world's
    last block (rank r + W/2) comes in one more one-way pass."""
    _, world = rank_and_world()
    rightward = leftward = x
    for _ in range((world - 1) // 2):
        rightward, leftward = ring_pass_with_grad([rightward, leftward], [1, -1])
        yield rightward  # from rank r - k
        yield leftward   # from rank r + k
    if world > 1 and world % 2 == 0:
        yield ring_pass_with_grad([rightward], [1])[0]


def other_ranks_order() -> list[int]:
    """The ranks whose blocks other_ranks_blocks yields, in its order (a loss that pairs each
    block with its rank's labels reads them here)."""
    rank, world = rank_and_world()
    order = [(rank + sign * k) % world for k in range(1, (world - 1) // 2 + 1) for sign in (-1, 1)]
    return order + ([(rank + world // 2) % world] if world > 1 and world % 2 == 0 else [])


# ---------------------------------------------------------------- rows sharded over the ranks (no gradients)

def shard_rows(n: int) -> list[int]:
    """This rank's row indices of n rows, padded with the last row so every rank gets the same
    count: every rank then runs the same number of forwards, which ZeRO-3 needs."""
    rank, world = rank_and_world()
    per = -(-n // world)
    idx = list(range(rank * per, min(n, (rank + 1) * per)))
    return idx + [max(n - 1, 0)] * (per - len(idx))


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of shard_rows: every rank's rows, in order, without the padding."""
    _, world = rank_and_world()
    if world == 1:
        return local[:n]
    x = _to_comm(local)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return _back(torch.cat(parts)[:n], local.device)


# ---------------------------------------------------------------- small agreements

def broadcast_object(value, src: int = 0):
    """Rank src's value on every rank (any picklable object)."""
    _, world = rank_and_world()
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# a week: "no limit" for the waits of on_rank0 (the heartbeat, not this, notices a dead rank 0)
PATIENT_TIMEOUT = datetime.timedelta(days=7)
_patient_group = None  # (the default group it belongs to, the gloo group)


def on_rank0(fn, *args, **kwargs):
    """fn(*args, **kwargs) run on rank 0 alone; its result (any picklable value) on every rank.

    Host work on one rank (a scikit-learn probe, a checkpoint conversion, writing an export) can
    outlast train.dist_timeout_s, the bound of every collective of the default group; waiting for
    it there would end the run (gloo raises, NCCL aborts the job), and a conversion killed that
    way starts over at every rerun. So the other ranks wait on a gloo group of their own whose
    timeout is a week: what stops them waiting for a rank 0 that died is the heartbeat
    (engine/watchdog.py), which names it within train.dist_timeout_s. An exception of fn is raised
    on rank 0 as it is and on the others as a RuntimeError that quotes it."""
    global _patient_group
    rank, world = rank_and_world()
    if world == 1:
        return fn(*args, **kwargs)
    if _patient_group is None or _patient_group[0] is not dist.group.WORLD:  # (a new default group: a new one)
        # every rank calls on_rank0 at the same point, so creating the group here is a collective
        _patient_group = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT))
    box, error = [None], None
    if rank == 0:
        try:
            box = [("value", fn(*args, **kwargs))]
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait a week
            error, box = e, [("error", f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(box, src=0, group=_patient_group[1])
    kind, value = box[0]
    if error is not None:
        raise error
    if kind == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def all_gather_object(value) -> list:
    """Every rank's value (any picklable object), in rank order, on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(value: float | int | torch.Tensor) -> float:
    """The sum of a number (or a one-element tensor, on any device) over the ranks, on the host;
    a blocking collective."""
    if isinstance(value, torch.Tensor):
        t = value.detach().reshape(()).to(comm_device(), torch.float64)
    else:
        t = torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.int64, device=comm_device())
    if rank_and_world()[1] > 1:
        dist.all_reduce(t)
    return _back(t, "cpu").item()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any rank (a blocking collective)."""
    t = torch.tensor([int(flag)], device=comm_device())
    if rank_and_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(_back(t, "cpu").item())


class HostFlag:
    """A flag the ranks agree on without waiting for the device: an all-reduce (max) over a CPU
    (gloo) group of its own, started by one call and collected by the next, so every rank learns
    of a value one call after any rank set it (engine/state.py's stop signals)."""

    def __init__(self):
        world = rank_and_world()[1]
        # a simulated world (init_simulated_world) has no peers for gloo to meet: a fake group too
        backend = "fake" if world > 1 and dist.get_backend() == "fake" else "gloo"
        self.group = dist.new_group(backend=backend) if world > 1 else None
        self.pending = None  # (work, tensor) of the all-reduce in flight

    def exchange(self, value: int) -> int:
        """The maximum over ranks of the values handed to the previous call (0 at the first);
        starts the exchange of `value`. Every rank calls it the same number of times."""
        if self.group is None:
            return value
        seen = 0
        if self.pending is not None:
            work, t = self.pending
            work.wait()
            seen = int(t.item())  # a CPU tensor: the host's own value, no device wait
        t = torch.tensor([int(value)])
        self.pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True), t)
        return seen


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()

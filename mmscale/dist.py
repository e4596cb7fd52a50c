"""Everything that talks across ranks: process-group start-up, rank/world, gathers with and
without gradients, sharding rows over the ranks, broadcasts and any-rank flags.

Models never call this module; losses, evaluation, data caches and the engine do. All helpers
work unchanged in one process without a process group (world = 1).

Gradient convention (DeepSpeed and DDP average parameter gradients over the W ranks): a loss
computed on embeddings gathered with `all_gather_with_grad` sends each rank's rows the sum over
ranks of their gradients; after the 1/W average the parameters get exactly the gradient of one
process holding the whole batch. See mmscale/losses.py for the two ways the CLIP loss uses it.
"""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> None:
    """Join the process group the launcher (deepspeed, torchrun, srun) describes, or make a
    one-process group when run as plain `python`. timeout_s bounds every collective."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), **kwargs)


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
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def gather_outputs(out: dict, shared=()) -> dict:
    """This rank's per-sample outputs all-gathered (with gradients) into the global batch; the
    names in `shared` (one value for the whole batch, e.g. a logit scale) are kept as they are."""
    return {k: v if k in shared else all_gather_with_grad(v) for k, v in out.items()}


def global_index(local_index: torch.Tensor) -> torch.Tensor:
    """Gathered per-rank row indices (each rank's 0..n-1) -> indices into the gathered batch."""
    _, world = rank_and_world()
    n = local_index.shape[0] // world
    return local_index + torch.arange(local_index.shape[0], device=local_index.device) // n * n


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
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)[:n]


# ---------------------------------------------------------------- small agreements

def broadcast_object(value, src: int = 0):
    """Rank src's value on every rank (any picklable object)."""
    _, world = rank_and_world()
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(value: float | int, device=None) -> float:
    """The sum of a number over the ranks (a blocking collective)."""
    t = torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.int64, device=device)
    if rank_and_world()[1] > 1:
        dist.all_reduce(t)
    return t.item()


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank if it is true on any rank (a blocking collective)."""
    t = torch.tensor([int(flag)], device=device)
    if rank_and_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()

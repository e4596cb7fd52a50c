"""Run a function on N CPU ranks over gloo (the same process-group setup DeepSpeed uses)."""
import datetime
import os
import traceback

import torch.multiprocessing as mp


def _worker(rank, world, port, fn, args, errors, timeout_s=None):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TOKENIZERS_PARALLELISM="false")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        # timeout_s bounds every collective of the default group, as train.dist_timeout_s does
        kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group("gloo", rank=rank, world_size=world, **kwargs)
        fn(rank, world, *args)
    except BaseException:
        errors.put(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def leave_without_cleanup():
    """End this rank now, skipping destroy_process_group: after a collective timed out the group is
    in an undefined state (PyTorch's advice is to abort the process), and tearing it down while a
    peer's data still arrives can abort the process inside gloo."""
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world, *args, timeout_s=None):
    """fn(rank, world, *args) on `world` gloo ranks; timeout_s bounds the default group's collectives."""
    from conftest import free_port
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, free_port(), fn, args, errors, timeout_s), nprocs=world,
                       start_method="spawn")
    if not errors.empty():
        raise AssertionError(errors.get())

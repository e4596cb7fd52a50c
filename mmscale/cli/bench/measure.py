"""Speed and memory of a recipe's real training step, and of open_clip's trainer on the same model.

    mmscale-bench recipes/tiny.yaml --synthetic
    mmscale-bench recipes/tiny.yaml --vs-open-clip ViT-S-32 --batch 64 --precision fp32
    torchrun --nproc_per_node 8 -m mmscale.cli.bench recipes/cmla.yaml --synthetic   # 8 GPUs
    mmscale-bench recipes/cmla_random.yaml --synthetic --simulate-ranks 8 ...      # what 8 ranks send

Runs W warm-up and N timed steps of the recipe's own step (the trainer's train_step: the task's
forward and loss, the gradient cache when train.grad_cache_chunk is set, DeepSpeed's optimizer step)
on the current device, then a few more under torch.profiler, timed phase by phase by the step's
`mmscale/<phase>` ranges. Reports samples/s, the time split (data wait, forward or no-grad embed,
loss, backward or re-forward + backward, optimizer; communication is measured inside those by the
profiler), the collectives of a step with their bytes (CommCounter), peak memory (CUDA max allocated, or the process's peak RSS on CPU), FLOP per sample
(torch.utils.flop_counter on one forward + backward of the model) and MFU where the device's peak is
known, the attention kernels the towers use, and host syncs per step: reads of device values
(Tensor.item, bool, float, int, tolist, numpy), split into those of mmscale's loop and of DeepSpeed.
--vs-open-clip MODEL puts open_clip's MODEL towers into the recipe (no heads, learnt temperature:
CLIP) and also runs open_clip's own trainer (open_clip_train.main, synthetic data) on the same
model, batch and precision, in the same invocation, and prints mmscale / open_clip; then it
alternates mmscale's step with open_clip's model, ClipLoss and fused AdamW in a bare torch loop,
step by step in this process (both see the same load: the steadier ratio on a shared machine).
--simulate-ranks W runs this process as rank 0 of W over torch's fake process group, whose
collectives move nothing: the counts and bytes are a W-rank step's, nothing else is (no peer's
data arrives, so losses, times and gradients are not a W-rank run's).
Writes everything as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from .instruments import (CommCounter, SyncCounter, attention_kernels, current_memory, device_name,
                          flop_per_sample, peak_memory, peak_tflops, profiled_phases, synchronize, versions)
from .openclip import interleaved_vs_bare_open_clip, open_clip_overrides, open_clip_rate
from .report import report, save, table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmscale-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="the recipe whose step is measured (default: none; required unless --table)")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides (default: none)")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (default: 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--split-steps", type=int, default=2,
                   help="extra steps timed phase by phase, 0 = none (default: 2)")
    p.add_argument("--synthetic", action="store_true",
                   help="repeat one batch from the recipe's loader, already on the device, so no data wait "
                        "(default: off, the recipe's loader)")
    p.add_argument("--batch", type=int, help="train.global_batch_size (default: the recipe's)")
    p.add_argument("--chunk", type=int, help="train.grad_cache_chunk, 0 = off (default: the recipe's)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="train.precision (default: the recipe's)")
    p.add_argument("--compile", action="store_true", help="train.compile=true (default: the recipe's)")
    p.add_argument("--vs-open-clip", metavar="MODEL",
                   help="open_clip MODEL towers in the recipe, and open_clip's trainer on them for a ratio, and its "
                        "model in a bare loop alternated with mmscale's step (default: none)")
    p.add_argument("--open-clip-workers", type=int, default=1, help="open_clip's loader workers (default: 1)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (default: count)")
    p.add_argument("--simulate-ranks", type=int, metavar="W",
                   help="run as rank 0 of W ranks in this one process (torch's fake process group: collectives "
                        "move nothing), to count what a W-rank step communicates; its times, memory and losses "
                        "are not a W-rank run's (default: the launcher's ranks)")
    p.add_argument("--json", help="where to write the results (default: runs/bench/<recipe>-<time>.json)")
    p.add_argument("--table", nargs="+", metavar="JSON",
                   help="print earlier results as one markdown table instead of measuring (default: measure)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_intermixed_args(argv)  # overrides may come after options
    if args.table:
        print(table([json.load(open(f)) for f in args.table]))
        return 0
    if not args.recipe:
        p.error("give a recipe (or --table JSON...)")
    if (args.vs_open_clip or args.simulate_ranks) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every rank would start open_clip's trainer (a process group of its own) on the same GPUs
        p.error("--vs-open-clip and --simulate-ranks run in one process: start mmscale-bench with plain python, "
                "not a launcher")
    if args.simulate_ranks:
        from mmscale.dist import init_simulated_world
        init_simulated_world(args.simulate_ranks)

    cfg, trainer = build(args)
    if args.simulate_ranks:
        from mmscale.dist import mirror_simulated_peers
        mirror_simulated_peers()  # now that DeepSpeed made its groups
    batches = Batches(trainer, args.synthetic)
    # the step's own growth: peak RSS (or CUDA max allocated) above what is held before the first
    # step (the model, the optimizer, a --synthetic batch)
    start_memory = current_memory(trainer.device)
    warm_up(trainer, batches, args.warmup)
    seconds, data_wait, syncs, comm = timed_steps(trainer, batches, args.steps)
    memory = peak_memory(trainer.device)
    split = phase_split(trainer, batches, args.split_steps, data_wait / args.steps)

    t = cfg.train
    samples_per_s = t.global_batch_size * args.steps / seconds
    result = {
        "command": " ".join(["mmscale-bench", *(sys.argv[1:] if argv is None else argv)]),
        "recipe": args.recipe, "task": cfg.task, "device": device_name(trainer.device), "world": trainer.world,
        "precision": t.precision, "zero_stage": t.zero_stage, "global_batch": t.global_batch_size,
        "grad_cache_chunk": trainer.chunk if trainer.chunk < trainer.local_batch else 0, "compile": t.compile,
        "synthetic": args.synthetic, "warmup": args.warmup, "steps": args.steps,
        "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in trainer.engine.module.parameters()
                          if p.requires_grad),  # ZeRO 3 leaves each rank a partition: ds_numel is the whole
        "samples_per_s": samples_per_s, "step_s": seconds / args.steps, "split_s": split, **memory,
        "memory_before_steps_gb": start_memory,
        "host_syncs_per_step": {k: v / args.steps for k, v in syncs.items()},
        "collectives_per_step": comm.table(args.steps), "simulated_ranks": args.simulate_ranks or 0,
        "attention": attention_kernels(trainer.engine.module), "versions": versions(),
    }
    # the FLOP count and the interleaved comparison run on one device batch: the repeated one or the next
    sample = batches.on_device()
    if not args.no_flops:
        total = args.warmup + args.steps + args.split_steps
        result.update(flop_fields(trainer, sample, total, samples_per_s, result["device"], t.precision))
    if args.vs_open_clip:
        result.update(vs_open_clip(args, trainer, t, sample, samples_per_s))
    if trainer.rank == 0:
        print(report(result))
        print(f"wrote {save(result, args.recipe, args.json)}")
    return 0


def build(args):
    """The recipe with the command line's changes, and a trainer on it that writes nothing that
    lasts: no checkpoints, evaluation, export or log lines, its run folder a temporary one."""
    from mmscale.config import ConfigError, load_config
    from mmscale.engine import Trainer
    from mmscale.tasks import build_task
    over = list(args.overrides)
    if args.vs_open_clip:
        over += open_clip_overrides(args.vs_open_clip)
    over += [f"train.global_batch_size={args.batch}"] * bool(args.batch)
    over += [f"train.grad_cache_chunk={args.chunk}"] * (args.chunk is not None)
    over += [f"train.precision={args.precision}"] * bool(args.precision)
    over += ["train.compile=true"] * args.compile
    total = args.warmup + args.steps + args.split_steps
    over += [f"train.run_dir={tempfile.mkdtemp(prefix='mmscale-bench-')}", "train.resume=false",
             "train.export=false", "train.checkpoint_every=0", "train.eval_every=0", "train.early_stopping.metric=",
             f"train.steps={total + 1}", f"train.log_every={10 ** 9}"]
    try:
        cfg = load_config(args.recipe, over)
        return cfg, Trainer(cfg, build_task(cfg))
    except ConfigError as e:
        raise SystemExit(f"bench: config error: {e}") from None


class Batches:
    """The step's batches: the recipe's loader, or with --synthetic its first batch, already on
    the device, again and again."""

    def __init__(self, trainer, synthetic: bool):
        self.trainer, self.stream = trainer, iter(trainer.stream)
        self.fixed = trainer.to_device(next(self.stream)) if synthetic else None

    def __next__(self) -> dict:
        return dict(self.fixed) if self.fixed is not None else next(self.stream)

    def on_device(self) -> dict:
        """One batch on the device: the repeated one, or the loader's next."""
        return self.fixed if self.fixed is not None else self.trainer.to_device(next(self.stream))


def warm_up(trainer, batches: Batches, steps: int) -> None:
    """Steps before timing; then the device's peak memory starts over."""
    for _ in range(steps):
        trainer.train_step(next(batches))
    synchronize(trainer.device)
    if trainer.device.type == "cuda":
        import torch
        torch.cuda.reset_peak_memory_stats(trainer.device)


def timed_steps(trainer, batches: Batches, steps: int) -> tuple[float, float, dict, CommCounter]:
    """Seconds of `steps` steps, the device's work included; the seconds of those spent waiting
    for batches; the host reads they made, by package; the collectives they ran."""
    data_wait = 0.0
    with SyncCounter(trainer.device) as syncs, CommCounter() as comm:
        tic = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t0
            trainer.train_step(batch)
        synchronize(trainer.device)
        seconds = time.perf_counter() - tic
    return seconds, data_wait, dict(syncs.counts), comm


def phase_split(trainer, batches: Batches, steps: int, data_wait: float) -> dict:
    """Seconds per step of each phase, over `steps` more steps under the profiler, then the data
    wait, then communication (inside the phases); the data wait alone when steps is 0."""
    if not steps:
        return {"data_wait": data_wait}

    def run():
        for _ in range(steps):
            trainer.train_step(next(batches))
    phases, comm = profiled_phases(run, trainer.device)
    return {**{k: v / steps for k, v in phases.items()}, "data_wait": data_wait,
            "communication (inside the above)": comm / steps}


def flop_fields(trainer, sample: dict, total: int, samples_per_s: float, device: str, precision: str) -> dict:
    """FLOP per sample of the model (at step 0 of `total`), those the step executes, and MFU where
    the device's peak is known."""
    from mmscale.tasks import Progress
    flops = flop_per_sample(trainer.task, sample, Progress(0, total))
    # the gradient cache runs every chunk forward once more, except the last (gradcache.py)
    chunks = trainer.local_batch // trainer.chunk
    peak = peak_tflops(device, precision)
    return {"flop_per_sample": flops,
            "executed_flop_per_sample": flops["forward_backward"] + flops["forward"] * (chunks - 1) / chunks,
            "mfu": flops["forward_backward"] * samples_per_s / trainer.world / (peak * 1e12) if peak else None}


def vs_open_clip(args, trainer, t, sample: dict, samples_per_s: float) -> dict:
    """open_clip's own trainer on the same model, batch and precision (rank 0), and its model in a
    bare loop alternated with mmscale's step (one rank); t: the recipe's train section."""
    out = {}
    if trainer.rank == 0:
        oc = open_clip_rate(args.vs_open_clip, t.global_batch_size, t.precision, args.steps, args.warmup,
                            args.open_clip_workers)
        out["open_clip"] = oc
        out["vs_open_clip"] = samples_per_s / oc["samples_per_s"] if oc["samples_per_s"] else None
    if trainer.world == 1:
        out["vs_bare_open_clip"] = interleaved_vs_bare_open_clip(args.vs_open_clip, trainer, sample, t.precision,
                                                                 args.steps)
    return out

"""Speed and memory of a recipe's real training step, and of open_clip's trainer on the same model.

    mmscale-bench recipes/tiny.yaml --synthetic
    mmscale-bench recipes/tiny.yaml --vs-open-clip ViT-S-32 --batch 64 --precision fp32
    torchrun --nproc_per_node 8 -m mmscale.cli.bench recipes/cmla.yaml --synthetic   # 8 GPUs

Runs W warm-up and N timed steps of the recipe's own step (the trainer's train_step: the task's
forward and loss, the gradient cache when train.grad_cache_chunk is set, DeepSpeed's optimizer step)
on the current device, then a few more under torch.profiler, timed phase by phase by the step's
`mmscale/<phase>` ranges. Reports samples/s, the time split (data wait, forward or no-grad embed,
loss, backward or re-forward + backward, optimizer; communication is measured inside those by the
profiler), peak memory (CUDA max allocated, or the process's peak RSS on CPU), FLOP per sample
(torch.utils.flop_counter on one forward + backward of the model) and MFU where the device's peak is
known, the attention kernels the towers use, and host syncs per step: reads of device values
(Tensor.item, bool, float, int, tolist, numpy), split into those of mmscale's loop and of DeepSpeed.
--vs-open-clip MODEL puts open_clip's MODEL towers into the recipe (no heads, learnt temperature:
CLIP) and also runs open_clip's own trainer (open_clip_train.main, synthetic data) on the same
model, batch and precision, in the same invocation, and prints mmscale / open_clip; then it
alternates mmscale's step with open_clip's model, ClipLoss and fused AdamW in a bare torch loop,
step by step in this process (both see the same load: the steadier ratio on a shared machine).
Writes everything as JSON.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

# device peaks, dense, TFLOP/s, for MFU: (name fragment, precision) -> peak
PEAK_TFLOPS = {("H100", "bf16"): 989.0, ("H200", "bf16"): 989.0, ("A100", "bf16"): 312.0,
               ("H100", "fp32"): 67.0, ("H200", "fp32"): 67.0, ("A100", "fp32"): 19.5}
PACKAGES = ("mmscale", "deepspeed", "transformers", "timm", "open_clip", "torch")
PHASE = "mmscale/"  # the step's profiler ranges: mmscale/forward, mmscale/embed, ...
COMM = re.compile(r"all_reduce|allreduce|all_gather|allgather|reduce_scatter|broadcast|gloo|nccl", re.IGNORECASE)


def synchronize(device) -> None:
    """Wait for the device's queued work, so a wall-clock interval holds that work (no-op off CUDA)."""
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


def profiled_phases(run, device) -> tuple[dict, float]:
    """Runs run() under torch.profiler; returns the seconds of each of the step's phases (the
    `mmscale/<phase>` ranges of engine/step.py and gradcache.py, in the order they first ran) and
    of communication, summed over the run.
    A phase's time is the longer of its range on the host and, on CUDA, the span of its device
    work (the profiler's GPU annotation of the range: first kernel's start to last one's end),
    since there the host only queues the work. On the CPU the work runs inside the range."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")
    with profile(activities=activities) as prof:
        run()
        synchronize(device)
    host, on_device = defaultdict(float), defaultdict(float)
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        if e.name.startswith(PHASE):
            span = (e.time_range.end - e.time_range.start) / 1e6
            (host if e.device_type == DeviceType.CPU else on_device)[e.name[len(PHASE):]] += span
    comm = sum((e.device_time_total if device.type == "cuda" else e.cpu_time_total)
               for e in prof.key_averages() if COMM.search(e.key)) / 1e6
    return {k: max(v, on_device.get(k, 0.0)) for k, v in host.items()}, comm


class SyncCounter:
    """Counts reads of tensor values on the host (Tensor.item, bool, ...) by the package whose code
    reads: the innermost caller outside torch itself (mmscale, deepspeed, transformers, timm, ...),
    told by the calling frame's module name. Only reads of tensors on the step's device count,
    decided by the tensor's own device: on CUDA those are the reads that wait for the GPU, and a
    CPU tensor holds the host's own value (the stop flag's gloo all-reduce, step counts), not
    counted. On a CPU run the device is the host and nothing waits: every read counts, standing
    for the reads a GPU run would wait on, and so do those of values a GPU run keeps on the host
    (torch's single-tensor Adam reads each parameter's step count, CUDA's fused Adam does not;
    under a launcher, the stop flag's read, one per step, filed under mmscale)."""

    METHODS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy")

    def __init__(self, device):
        self.device_type = device.type
        self.counts = defaultdict(int)
        self.saved = {}

    def __enter__(self):
        import torch
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            self.saved[name] = original
            setattr(torch.Tensor, name, self._wrap(original))
        return self

    def __exit__(self, *exc):
        import torch
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)

    def _wrap(self, original):
        counter = self

        def read(tensor, *args, **kwargs):
            if tensor.device.type == counter.device_type:
                frame, who = sys._getframe(1), "other"
                while frame is not None:
                    # by the module that runs, not its file's path: a checkout or venv under a
                    # folder named mmscale/ must not make deepspeed's frames mmscale's
                    package = frame.f_globals.get("__name__", "").partition(".")[0]
                    if package in PACKAGES and package != "torch":
                        who = package
                        break
                    frame = frame.f_back
                counter.counts[who] += 1
            return original(tensor, *args, **kwargs)
        return read


def attention_kernels(model) -> dict:
    """What each tower's attention runs on, as far as the tower says."""
    out = {}
    for name, tower in model.named_towers().items():
        inner = getattr(tower, "model", tower)
        config = getattr(inner, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            out[name] = f"transformers attn_implementation={config._attn_implementation}"
            continue
        fused = [m.fused_attn for m in inner.modules() if hasattr(m, "fused_attn")]
        if fused:
            out[name] = "timm F.scaled_dot_product_attention" if all(fused) else "timm eager attention"
            continue
        import torch.nn as nn
        if any(isinstance(m, nn.MultiheadAttention) for m in inner.modules()):
            out[name] = "torch nn.MultiheadAttention (SDPA inside)"
        else:
            out[name] = "no attention layer (CNN or MLP)"
    return out


def flop_per_sample(task, batch: dict, progress) -> dict:
    """FLOP of one forward and of one forward + backward of the task's model per sample, counted
    by torch's FlopCounterMode on a fresh CPU copy of the model (outside DeepSpeed, whose hooks a
    stray backward would disturb), on two samples of the batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    rows = {k: (v[:2].float() if v.is_floating_point() else v[:2]).cpu()
            for k, v in batch.items() if isinstance(v, torch.Tensor)}
    model = task.build_model().float()
    with FlopCounterMode(display=False) as forward_only, torch.no_grad():
        task.forward(model, rows, progress)
    with FlopCounterMode(display=False) as both:
        loss, _ = task.loss(task.forward(model, rows, progress), rows, progress)
        loss.backward()
    return {"forward": forward_only.get_total_flops() / 2, "forward_backward": both.get_total_flops() / 2}


def open_clip_rate(model: str, batch: int, precision: str, steps: int, warmup: int, workers: int) -> dict:
    """samples/s of open_clip's own trainer on synthetic data, from its per-step log lines."""
    precision = {"fp32": "fp32", "bf16": "amp_bf16"}[precision]
    with tempfile.TemporaryDirectory() as logs:
        cmd = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "synthetic", "--model", model,
               "--batch-size", str(batch), "--precision", precision, "--workers", str(workers),
               "--train-num-samples", str(batch * (steps + warmup)), "--epochs", "1", "--log-every-n-steps", "1",
               "--save-frequency", "0", "--logs", logs, "--name", "bench", "--lr", "1e-4", "--warmup", "10"]
        tic = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
        out = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise SystemExit(f"bench: open_clip's trainer failed ({proc.returncode}): {' '.join(cmd)}\n{out[-2000:]}")
    # "Batch (t): 12.759, 0.313507/s, 0.313507/s/gpu": the step's own rate (the time is a running mean)
    rates = [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, [\d.e+-]+/s, ([\d.e+-]+)/s/gpu", out)]
    timed = rates[warmup:] or rates
    return {"command": " ".join(cmd), "samples_per_s": len(timed) / sum(1 / r for r in timed) if timed else None,
            "steps_logged": len(rates), "wall_s": round(time.time() - tic, 1)}


def interleaved_vs_bare_open_clip(model: str, trainer, batch: dict, precision: str, steps: int) -> dict:
    """open_clip's MODEL with its ClipLoss and torch's fused AdamW in a bare torch loop, on the same
    batch, alternated step by step with mmscale's step in this process: both see the same load, so
    the ratio is free of what changes between two processes (the trainer's ratio is not)."""
    import open_clip
    import torch
    from open_clip.loss import ClipLoss

    device = trainer.device
    sync = functools.partial(synchronize, device)
    net = open_clip.create_model(model).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    clip_loss = ClipLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    images, texts = batch["image"].float(), batch["input_ids"]

    def bare_step():
        with autocast:
            image, text, scale = net(images, texts)[:3]
            loss = clip_loss(image, text, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def ours_step():
        trainer.train_step(dict(batch))

    seconds = {"mmscale": 0.0, "bare": 0.0}
    for i in range(steps + 1):  # the first round warms the bare loop up
        for name, step in (("mmscale", ours_step), ("bare", bare_step)):
            sync()
            tic = time.perf_counter()
            step()
            sync()
            if i:
                seconds[name] += time.perf_counter() - tic
    n = len(images) * steps
    del net, opt
    return {"steps": steps, "mmscale_samples_per_s": n / seconds["mmscale"], "bare_samples_per_s": n / seconds["bare"],
            "ratio": seconds["bare"] / seconds["mmscale"]}


def versions() -> dict:
    import deepspeed
    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__}
    for name in ("timm", "transformers", "open_clip"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def device_name(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def peak_memory(device) -> dict:
    import resource
    import torch
    if device.type == "cuda":
        return {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30, "memory_kind": "CUDA max allocated"}
    return {"peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "memory_kind": "process peak RSS"}


def current_memory(device) -> float:
    """GB held now: CUDA allocated, or the process's resident set on the CPU."""
    import torch
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 30
    import psutil
    return psutil.Process().memory_info().rss / 2 ** 30


def open_clip_overrides(model: str) -> list[str]:
    import open_clip
    config = open_clip.get_model_config(model)
    if config is None:
        raise SystemExit(f"bench: --vs-open-clip {model}: not an open_clip model (open_clip.list_models())")
    size = config["vision_cfg"].get("image_size", 224)
    return ["task=clip", "model.image.source=open_clip", f"model.image.name={model}", "model.image.kwargs={}",
            f"model.image.image_size={size if isinstance(size, int) else size[0]}",
            "model.image.pretrained=false", "model.text.source=open_clip", f"model.text.name={model}",
            "model.text.config_overrides={}", "model.text.pretrained=false", "model.heads.enabled=false",
            "model.fusion.type=none", "model.learn_temperature=true"]


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
    if args.vs_open_clip and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every rank would start open_clip's trainer (a process group of its own) on the same GPUs
        p.error("--vs-open-clip runs in one process: start mmscale-bench with plain python, not a launcher")

    import torch
    from mmscale.config import ConfigError, load_config
    from mmscale.engine import Trainer
    from mmscale.tasks import Progress, build_task

    run_dir = tempfile.mkdtemp(prefix="mmscale-bench-")
    over = list(args.overrides)
    if args.vs_open_clip:
        over += open_clip_overrides(args.vs_open_clip)
    over += [f"train.global_batch_size={args.batch}"] * bool(args.batch)
    over += [f"train.grad_cache_chunk={args.chunk}"] * (args.chunk is not None)
    over += [f"train.precision={args.precision}"] * bool(args.precision)
    over += ["train.compile=true"] * args.compile
    total = args.warmup + args.steps + args.split_steps
    over += [f"train.run_dir={run_dir}", "train.resume=false", "train.export=false", "train.checkpoint_every=0",
             "train.eval_every=0", "train.early_stopping.metric=", f"train.steps={total + 1}",
             f"train.log_every={10 ** 9}"]
    try:
        cfg = load_config(args.recipe, over)
        trainer = Trainer(cfg, build_task(cfg))
    except ConfigError as e:
        raise SystemExit(f"bench: config error: {e}") from None
    device, rank = trainer.device, trainer.rank
    batches = iter(trainer.stream)
    fixed = trainer.to_device(next(batches)) if args.synthetic else None

    def next_batch():
        return dict(fixed) if fixed is not None else next(batches)

    sync = functools.partial(synchronize, device)

    # the step's own growth: peak RSS (or CUDA max allocated) above what is held before the first
    # step (the model, the optimizer, a --synthetic batch)
    start_memory = current_memory(device)
    for _ in range(args.warmup):
        trainer.train_step(next_batch())
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data_wait = 0.0
    with SyncCounter(device) as syncs:
        tic = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            batch = next_batch()
            data_wait += time.perf_counter() - t0
            trainer.train_step(batch)
        sync()
        seconds = time.perf_counter() - tic
    memory = peak_memory(device)

    split = {"data_wait": data_wait / args.steps}
    if args.split_steps:
        def split_steps():
            for _ in range(args.split_steps):
                trainer.train_step(next_batch())
        phases, comm = profiled_phases(split_steps, device)
        split = {**{k: v / args.split_steps for k, v in phases.items()}, **split,
                 "communication (inside the above)": comm / args.split_steps}

    t = cfg.train
    samples_per_s = t.global_batch_size * args.steps / seconds
    result = {
        "command": " ".join(["mmscale-bench", *sys.argv[1:]] if argv is None else ["mmscale-bench", *argv]),
        "recipe": args.recipe, "task": cfg.task, "device": device_name(device), "world": trainer.world,
        "precision": t.precision, "zero_stage": t.zero_stage, "global_batch": t.global_batch_size,
        "grad_cache_chunk": trainer.chunk if trainer.chunk < trainer.local_batch else 0, "compile": t.compile,
        "synthetic": args.synthetic, "warmup": args.warmup, "steps": args.steps,
        "samples_per_s": samples_per_s, "step_s": seconds / args.steps, "split_s": split, **memory,
        "memory_before_steps_gb": start_memory,
        "host_syncs_per_step": {k: v / args.steps for k, v in syncs.counts.items()},
        "attention": attention_kernels(trainer.engine.module), "versions": versions(),
    }
    # the FLOP count and the interleaved comparison run on one device batch: the repeated one or the next
    sample = fixed if fixed is not None else trainer.to_device(next(batches))
    if not args.no_flops:
        flops = flop_per_sample(trainer.task, sample, Progress(0, total))
        result["flop_per_sample"] = flops
        # the gradient cache runs every chunk forward once more, except the last (gradcache.py)
        chunks = trainer.local_batch // trainer.chunk
        executed = flops["forward_backward"] + flops["forward"] * (chunks - 1) / chunks
        result["executed_flop_per_sample"] = executed
        peak = next((v for (n, prec), v in PEAK_TFLOPS.items() if n in result["device"] and prec == t.precision), None)
        result["mfu"] = flops["forward_backward"] * samples_per_s / trainer.world / (peak * 1e12) if peak else None
    if args.vs_open_clip and rank == 0:
        oc = open_clip_rate(args.vs_open_clip, t.global_batch_size, t.precision, args.steps, args.warmup,
                            args.open_clip_workers)
        result["open_clip"] = oc
        result["vs_open_clip"] = samples_per_s / oc["samples_per_s"] if oc["samples_per_s"] else None
    if args.vs_open_clip and trainer.world == 1:
        result["vs_bare_open_clip"] = interleaved_vs_bare_open_clip(
            args.vs_open_clip, trainer, sample, t.precision, args.steps)
    if rank == 0:
        print(report(result))
        path = args.json or os.path.join("runs", "bench", f"{os.path.splitext(os.path.basename(args.recipe))[0]}-"
                                                           f"{time.strftime('%Y%m%d-%H%M%S')}.json")
        from mmscale.files import atomic_write_json
        atomic_write_json(path, result)
        print(f"wrote {path}")
    return 0


def table(results: list[dict]) -> str:
    """One row per result: the configuration, speed, memory and host reads."""
    head = ["recipe", "global batch", "chunk", "world", "precision", "ZeRO", "compile", "samples/s", "ms/sample",
            "peak memory GB", "host reads/step (mmscale / deepspeed / towers)"]
    rows = []
    for r in results:
        syncs = r["host_syncs_per_step"]
        towers = sum(v for k, v in syncs.items() if k not in ("mmscale", "deepspeed"))
        rows.append([os.path.basename(r["recipe"]), r["global_batch"], r["grad_cache_chunk"] or "off", r["world"],
                     r["precision"], r["zero_stage"], "on" if r["compile"] else "off", f"{r['samples_per_s']:.3f}",
                     f"{1000 / r['samples_per_s']:.1f}", f"{r['peak_memory_gb']:.2f}",
                     f"{syncs.get('mmscale', 0):g} / {syncs.get('deepspeed', 0):g} / {towers:g}"])
    if any("open_clip" in r for r in results):  # the ratio the comparison exists for
        head += ["open_clip trainer samples/s", "mmscale / open_clip", "mmscale / bare open_clip loop, interleaved"]
        for row, r in zip(rows, results):
            oc = r.get("open_clip", {}).get("samples_per_s")
            bare = r.get("vs_bare_open_clip", {}).get("ratio")
            row += [f"{oc:.3f}" if oc else "-", f"{r['vs_open_clip']:.2f}" if r.get("vs_open_clip") else "-",
                    f"{bare:.2f}" if bare else "-"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def report(r: dict) -> str:
    gc = f"gradient cache chunk {r['grad_cache_chunk']}" if r["grad_cache_chunk"] else "no gradient cache"
    lines = [f"mmscale bench: {r['recipe']} (task {r['task']}), global batch {r['global_batch']}, {gc}, "
             f"{r['world']} rank(s), {r['precision']}, ZeRO {r['zero_stage']}, compile {'on' if r['compile'] else 'off'}"
             f"{', synthetic on-device batch' if r['synthetic'] else ''}",
             f"  device              {r['device']}",
             f"  samples/s           {r['samples_per_s']:.2f}   (step {r['step_s']:.3f} s, mean of {r['steps']} "
             f"after {r['warmup']} warm-up)",
             "  split (s/step)      " + ", ".join(f"{k} {v:.4f}" for k, v in r["split_s"].items()),
             f"  peak memory         {r['peak_memory_gb']:.2f} GB ({r['memory_kind']})",
             "  host syncs/step     " + (", ".join(f"{k} {v:.1f}" for k, v in sorted(r["host_syncs_per_step"].items()))
                                        or "none"),
             "  attention           " + "; ".join(f"{k}: {v}" for k, v in r["attention"].items())]
    if "flop_per_sample" in r:
        f = r["flop_per_sample"]
        lines.append(f"  FLOP/sample         {f['forward_backward'] / 1e9:.2f} G forward+backward "
                     f"({f['forward'] / 1e9:.2f} G forward); executed {r['executed_flop_per_sample'] / 1e9:.2f} G")
        lines.append(f"  MFU                 {r['mfu']:.1%}" if r.get("mfu") is not None else
                     "  MFU                 n/a (no known peak for this device)")
    if "open_clip" in r:
        oc = r["open_clip"]
        ratio = f"{r['vs_open_clip']:.2f}" if r.get("vs_open_clip") else "n/a"
        rate = f"{oc['samples_per_s']:.2f}" if oc["samples_per_s"] else "n/a (no step lines in its log)"
        lines.append(f"  open_clip trainer   {rate} samples/s -> mmscale / open_clip = {ratio}")
    if "vs_bare_open_clip" in r:
        b = r["vs_bare_open_clip"]
        lines.append(f"  interleaved         open_clip's model in a bare torch loop {b['bare_samples_per_s']:.2f} samples/s, "
                     f"mmscale {b['mmscale_samples_per_s']:.2f}, alternated over {b['steps']} steps in this process "
                     f"-> mmscale / bare = {b['ratio']:.2f}")
    lines.append("  versions            " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""What mmscale-bench measures, each by one instrument: the step's phases (from its profiler
ranges) and its communication (time, and calls and bytes by collective), host reads of device
values, memory, the towers' attention kernels, FLOP per sample, and the device and versions the
numbers belong to."""
from __future__ import annotations

import os
import platform
import re
import sys
from collections import defaultdict

# device peaks, dense, TFLOP/s, for MFU: (name fragment, precision) -> peak
PEAK_TFLOPS = {("H100", "bf16"): 989.0, ("H200", "bf16"): 989.0, ("A100", "bf16"): 312.0,
               ("H100", "fp32"): 67.0, ("H200", "fp32"): 67.0, ("A100", "fp32"): 19.5}
PACKAGES = ("mmscale", "deepspeed", "transformers", "timm", "open_clip", "torch")
PHASE = "mmscale/"  # the step's profiler ranges: mmscale/forward, mmscale/embed, ...
COMM = re.compile(r"all_reduce|allreduce|all_gather|allgather|reduce_scatter|broadcast|gloo|nccl", re.IGNORECASE)
BACKEND_ROW = re.compile(r"(gloo|nccl|mpi|ucc|xccl|ccl):")  # a backend's row for one collective's work



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
               for e in collective_rows(prof.events())) / 1e6
    return {k: max(v, on_device.get(k, 0.0)) for k, v in host.items()}, comm


def collective_rows(events) -> list:
    """The profiler rows that are collectives, each collective once: the backend's own row
    (gloo:all_gather on gloo's worker thread; nccl:all_reduce, whose device time holds its
    kernels), or for a backend that names none, the innermost host row whose name says
    collective. One collective shows as several rows (on 2 gloo ranks an all-gather matched 3
    in a bare gather, 7 inside DeepSpeed: the autograd function, DeepSpeed's wrapper, c10d's op,
    gloo's work) and each row's time includes its children's, so summing every match counted it
    several times."""
    from torch.autograd import DeviceType
    rows = [e for e in events if e.device_type == DeviceType.CPU and COMM.search(e.name)]
    backend = [e for e in rows if BACKEND_ROW.match(e.name)]
    if backend:
        return backend

    def has_matching_descendant(e):
        return any(COMM.search(c.name) or has_matching_descendant(c) for c in e.cpu_children)
    return [e for e in rows if not has_matching_descendant(e)]


class CommCounter:
    """Counts the collectives this process issues, with their bytes, by (collective, dtype, the
    package that called it: deepspeed, mmscale, ...), through torch's pre-hook on every process
    group that exists when it starts (so after DeepSpeed made its groups): every path reaches it,
    whoever bound which torch.distributed function. A collective's bytes are those of the whole
    buffer it reduces or gathers (an all-reduce's or broadcast's tensor, a reduce-scatter's input,
    an all-gather's output); over a ring of W ranks each rank sends 2 (W-1)/W of an all-reduce's
    and (W-1)/W of a reduce-scatter's or all-gather's."""

    HOOK_ID = 35  # any id; removed again on exit

    def __init__(self):
        self.counts = defaultdict(lambda: [0, 0])  # (collective, dtype, package) -> [calls, bytes]
        self.groups = []

    def __enter__(self):
        from torch.distributed import distributed_c10d as c10d
        self.groups = list(c10d._world.pg_map) if c10d.is_initialized() else []
        for group in self.groups:
            group.register_pre_hook(self.HOOK_ID, self._count)
        return self

    def __exit__(self, *exc):
        for group in self.groups:
            group.unregister_pre_hook(self.HOOK_ID)

    def _count(self, args) -> None:
        name = args.name.name.lower()  # HookOpName.ALLREDUCE -> "allreduce"
        whole = args.output_tensors if name == "allgather" else args.input_tensors
        dtype = str(whole[0].dtype).replace("torch.", "") if whole else "-"
        key = (COLLECTIVE_NAMES.get(name, name), dtype, _calling_package(sys._getframe(1)))
        self.counts[key][0] += 1
        self.counts[key][1] += sum(t.numel() * t.element_size() for t in whole)

    def table(self, steps: int = 1) -> list[dict]:
        """The counts per step, one row per (collective, dtype, package)."""
        return [{"collective": k[0], "dtype": k[1], "package": k[2], "calls": v[0] / steps, "bytes": v[1] / steps}
                for k, v in sorted(self.counts.items())]


COLLECTIVE_NAMES = {"allreduce": "all_reduce", "allgather": "all_gather", "reduce_scatter": "reduce_scatter",
                    "alltoall": "all_to_all"}


def _calling_package(frame) -> str:
    """The package of the innermost caller outside torch (mmscale, deepspeed, transformers, ...),
    told by the running module's name, not its file's path (a checkout under a folder named
    mmscale/ must not make deepspeed's frames mmscale's)."""
    while frame is not None:
        package = frame.f_globals.get("__name__", "").partition(".")[0]
        if package in PACKAGES and package != "torch":
            return package
        frame = frame.f_back
    return "other"


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
                counter.counts[_calling_package(sys._getframe(1))] += 1
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
    by `flop_counter` on a fresh CPU copy of the model (outside DeepSpeed, whose hooks a stray
    backward would disturb), on two samples of the batch (its images normalised, as the step does)."""
    import torch
    from mmscale.data.batches import model_inputs
    rows = model_inputs({k: v[:2].cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)}, torch.float32)
    rows = {k: v.float() if v.is_floating_point() else v for k, v in rows.items()}
    model = task.build_model().float()
    with flop_counter() as forward_only, torch.no_grad():
        task.forward(model, rows, progress)
    with flop_counter() as both:
        loss, _ = task.loss(task.forward(model, rows, progress), rows, progress)
        loss.backward()
    return {"forward": forward_only.get_total_flops() / 2, "forward_backward": both.get_total_flops() / 2}


def flop_counter():
    """torch's FlopCounterMode, taught the CPU's attention kernel: on the CPU,
    scaled_dot_product_attention runs `_scaled_dot_product_flash_attention_for_cpu` (and its
    backward), which torch's table lacks, so attention counted 0 FLOP and a ViT-B/16 forward
    came out 4% low. They get the formulas of the GPU kernels (QK^T and PV: 4 N^2 d a head's
    forward), from torch's own sdpa_flop_count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


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


def peak_tflops(device: str, precision: str) -> float | None:
    """The device's dense peak for MFU, where known (PEAK_TFLOPS), by its name."""
    return next((v for (n, prec), v in PEAK_TFLOPS.items() if n in device and prec == precision), None)

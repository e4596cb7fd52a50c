"""When a step's gradients cross ranks, and in which dtype: one reduction per optimizer step, and
bf16 chunk gradients summed in fp32 before it.

Each parameter's gradient is averaged over the data-parallel ranks in train.grad_reduce_dtype
(DeepSpeed's communication_data_type, set by backend.deepspeed_config). With the gradient cache a
step runs C backwards (one per chunk); what crosses ranks then, by ZeRO stage:

| ZeRO | DeepSpeed on its own | here |
| --- | --- | --- |
| 0 | an all-reduce at the accumulation boundary (the last backward) | the same; under bf16, the chunks summed in fp32 first (`Fp32Sum`), then that all-reduce |
| 1 | an all-reduce at the boundary; under bf16 its BF16_Optimizer sums the chunks in fp32 (data_types.grad_accum_dtype) | the same |
| 2, 3 | a reduction in every backward (their gradient hooks), summed into fp32 partitions under bf16 | `step` (train.grad_cache_reduce): the backwards inside `engine.coalesce_grad_reduction()`, one reduction when it exits; under bf16, the chunks summed in fp32 first. `chunk`: DeepSpeed's own, C reductions |

The fp32 sum: after each chunk's backward the bf16 `.grad` of every parameter is added into an
fp32 tensor and zeroed in place (it stays allocated: DeepSpeed's ZeRO-3 parameters are empty
outside their forward, so a full-size gradient could not be assigned back); after the last,
the sum is copied into `.grad`, the one rounding to bf16 before the reduction (DeepSpeed's
ZeRO 0/2/3 reduction buckets hold the parameter's dtype). The plain bf16 step hands the
reduction a bf16 gradient too, so the cached step stays within one rounding of it for any number
of chunks; summed in bf16, each chunk would round the running sum once more.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch.profiler import record_function


def cached_reduce_mode(zero_stage: int, setting: str) -> str:
    """train.grad_cache_reduce resolved: "step" or "chunk". auto: step under ZeRO 0-2 (ZeRO 2's
    full local gradients cost 6 bytes a parameter under bf16, docs/PERFORMANCE.md section 10),
    chunk under ZeRO 3 (the stage for models whose full gradients a rank should not hold)."""
    if setting == "auto":
        return "chunk" if zero_stage == 3 else "step"
    return setting


class Fp32Sum:
    """The fp32 sum of a step's bf16 chunk gradients (see the module's docstring)."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.sums: dict = {}  # parameter -> fp32 sum of its gradients so far this step

    def add(self) -> None:
        """After a chunk's backward: its gradients into the sums, and .grad zeroed."""
        grads, sums = [], []
        for p in self.params:
            if p.grad is None:  # e.g. the temperature: its gradient comes with one chunk only
                continue
            if p not in self.sums:
                self.sums[p] = torch.zeros_like(p.grad, dtype=torch.float32)
            grads.append(p.grad)
            sums.append(self.sums[p])
        if grads:
            torch._foreach_add_(sums, grads)
            torch._foreach_zero_(grads)

    def write_back(self) -> None:
        """The sums into .grad (rounded to its dtype), for the reduction; the sums are freed."""
        params = list(self.sums)
        if params:
            torch._foreach_copy_([p.grad for p in params], [self.sums[p] for p in params])
        self.sums = {}


class GradReduction:
    """How one step's backwards meet DeepSpeed's reduction: `backward(surrogate, last)` for each,
    inside `with reduction.step():`."""

    def __init__(self, engine, chunks: int, setting: str):
        stage = engine.zero_optimization_stage()
        self.engine = engine
        self.mode = cached_reduce_mode(stage, setting) if chunks > 1 else "step"
        # DeepSpeed reduces ZeRO 2-3 gradients in every backward unless coalesced
        self.coalesce = chunks > 1 and stage >= 2 and self.mode == "step"
        # bf16 chunks summed here: where DeepSpeed would sum them in bf16 (ZeRO 0, coalesced ZeRO 2-3)
        bf16 = engine.bfloat16_enabled()
        self.sum = Fp32Sum(engine.module.parameters()) if chunks > 1 and bf16 and (stage == 0 or self.coalesce) \
            else None
        # ZeRO 0 under bf16: the all-reduce waits for the sum, so the last backward is no boundary
        self.deferred = self.sum is not None and stage == 0

    @contextlib.contextmanager
    def step(self):
        """Around the backwards of one step; the reduction is done when it exits. A reduction run
        here (coalesced, or ZeRO 0's after the fp32 sum) is the profiler range mmscale/reduce;
        the others run inside the backwards."""
        coalesced = self.engine.coalesce_grad_reduction() if self.coalesce else contextlib.nullcontext()
        coalesced.__enter__()
        try:
            yield
            if self.sum is not None:
                self.sum.write_back()  # before the coalesced reduction, which runs at the exit
        except BaseException:
            if not coalesced.__exit__(*sys.exc_info()):
                raise
            return
        with record_function("mmscale/reduce") if self.coalesce or self.deferred else contextlib.nullcontext():
            coalesced.__exit__(None, None, None)
            if self.deferred:
                self.engine.set_gradient_accumulation_boundary(True)
                if self.engine.enable_backward_allreduce:  # off on one rank (backend.initialize)
                    self.engine.allreduce_gradients()
        self.engine.set_gradient_accumulation_boundary(True)  # engine.step() applies at a boundary

    def backward(self, surrogate: torch.Tensor, last: bool) -> None:
        """One backward; `last`: the step's last. Inside a coalesced step DeepSpeed reduces nothing
        whatever the boundary says; ZeRO 0-1 and per-chunk ZeRO 2-3 reduce at the boundary or in
        every backward as the table above says."""
        self.engine.set_gradient_accumulation_boundary(last and not self.deferred)
        self.engine.backward(surrogate)
        if self.sum is not None:
            self.sum.add()

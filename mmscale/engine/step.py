"""One training step on the DeepSpeed engine: forward and backward over this rank's batch (whole,
or gradient-cached chunk by chunk), then the optimizer step unless the gradients are not finite.

Nothing is read back to the host: the loss and the task's metrics stay device tensors, so a step
that is not logged never waits for the device. The one exception is the non-finite check on a
bare torch optimizer (ZeRO 0 in fp32), which has to know before it steps; under ZeRO 1-3 and
DeepSpeed's bf16 optimizer that check is DeepSpeed's own (and so is its wait).

Images arrive as uint8 and are normalised chunk by chunk, just before their chunk is embedded
(data.batches.model_inputs): the step holds its batch as bytes, a quarter of float32's size.
When the chunks' gradients cross ranks, and in which dtype, is reduction.py's.

Each phase is a profiler range, `mmscale/<phase>` (forward, loss, backward, optimizer; the
gradient cache's embed, loss, reforward_backward; reduce, the step's one gradient reduction where
it runs after the backwards, reduction.py): named in any torch.profiler trace, and what
mmscale-bench times the phases by. With no profiler running, a range costs what a few small
tensor ops do (~10 us on a CPU core).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from ..data.batches import model_inputs
from ..gradcache import grad_cache_step
from ..models.contract import Bounded
from .reduction import GradReduction


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's loss, a device scalar
    metrics: dict  # the task's metrics, device scalars
    applied: bool  # False: the gradients were not finite and no weight changed


class TrainStep:
    def __init__(self, engine, task, local_batch: int, chunk: int, reduce: str = "auto",
                 dtype: torch.dtype = torch.float32):
        self.engine, self.task = engine, task
        self.local_batch, self.chunk, self.dtype = local_batch, chunk, dtype
        self.reduction = GradReduction(engine, local_batch // chunk, reduce)
        # ZeRO 1-3 (and DeepSpeed's bf16 optimizer) skip a step whose gradients are not finite by
        # themselves; on a bare torch optimizer (ZeRO 0, fp32) this step checks before stepping
        self.checks_grads = not hasattr(engine.optimizer, "overflow")
        self.bounds = [(p, lo, hi) for m in engine.module.modules() if isinstance(m, Bounded)
                       for p, (lo, hi) in m.parameter_bounds().items()]

    def __call__(self, batch: dict, progress) -> StepResult:
        loss, metrics = self.forward_backward(batch, progress)
        with record_function("mmscale/optimizer"):
            applied = self.optimizer_step()
        return StepResult(loss, metrics, applied)

    def forward_backward(self, batch: dict, progress) -> tuple[torch.Tensor, dict]:
        """Gradients of the task loss over the whole local batch, reduced across ranks."""
        def forward(b):
            return self.task.forward(self.engine, model_inputs(b, self.dtype), progress)

        def loss_fn(out):
            return self.task.loss(out, batch, progress)
        with self.reduction.step():
            if self.chunk < self.local_batch:
                return grad_cache_step(forward, loss_fn, batch, self.chunk, self.reduction.backward,
                                       shared=self.task.shared_outputs)
            with record_function("mmscale/forward"):
                out = forward(batch)
            with record_function("mmscale/loss"):
                loss, metrics = loss_fn(out)
            with record_function("mmscale/backward"):
                self.reduction.backward(loss, True)
        return loss.detach(), metrics

    def optimizer_step(self) -> bool:
        """One optimizer step, unless the gradients are not finite; True if the weights changed."""
        if self.checks_grads:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
                self.engine.zero_grad()
                return False
        self.engine.step()
        if not self.engine.was_step_applied():
            return False
        self.clamp_to_bounds()
        return True

    def clamp_to_bounds(self) -> None:
        """Parameters with bounds (a learnt temperature) are clamped where the optimizer keeps its
        master copy, and in the module's own copy, so the value the forward sees and the one the
        optimizer updates agree and gradients keep flowing."""
        for p, lo, hi in self.bounds:
            clamp_master(self.engine.optimizer, p, lo, hi)
            if p.numel():  # ZeRO-3 keeps only a partition, the forward then clamps
                with torch.no_grad():
                    p.clamp_(lo, hi)


def clamp_master(optimizer, p: torch.nn.Parameter, lo: float, hi: float) -> None:
    """Clamps the fp32 master copy of p wherever DeepSpeed keeps it:
    - ZeRO-3: this rank's partition of p (a [1] parameter lives on one rank, the others hold
      nothing of it; the full-parameter API would write past their empty partitions);
    - ZeRO 1/2 and the bf16 optimizer: p's fragment of this rank's fp32 partition, clamped in
      place (element-wise, so no collective: only the ranks whose partition holds part of p have
      a fragment mapping, and the full-parameter API's all-reduce, entered by those ranks alone,
      hung a 2-rank run whose temperature sat in rank 1's partition);
    - bf16 under ZeRO 0 (FP16_UnfusedOptimizer): its own fp32 copy of p, found by position;
    - a bare torch optimizer: p itself (clamped by the caller)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param
    if hasattr(p, "ds_id"):
        local = safe_get_local_fp32_param(p)
        if local is not None and local.numel():
            safe_set_local_fp32_param(p, local.clamp(lo, hi))
    elif getattr(p, "_hp_mapping", None) is not None:
        with torch.no_grad():
            p._hp_mapping.get_hp_fragment().clamp_(lo, hi)
    elif hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):
        for low, master in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for q, m in zip(low, master):
                if q is p:
                    with torch.no_grad():
                        m.clamp_(lo, hi)

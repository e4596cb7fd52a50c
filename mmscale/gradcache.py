"""Gradient cache (Gao et al. 2021) for any loss that couples the samples of a batch.

1. embed every chunk without autograd (activations of one chunk alive at a time), except the
   last chunk, which is embedded with autograd and its graph kept;
2. compute the loss on the detached, concatenated embeddings (this may all-gather) and
   its gradient w.r.t. them;
3. back-propagate <embedding, cached gradient> through the kept last chunk first (no
   re-forward: its graph is there), then re-run each other chunk with autograd, replaying the
   RNG state of step 1 so dropout masks match, and back-propagate the same way.

Gradients equal those of one forward/backward over the whole batch; peak activation memory is
that of one chunk (the kept graph is freed before the first re-forward). Keeping the last chunk
saves one chunk's re-forward: the step costs 1 + (C - 1) / C forwards and one backward for C
chunks instead of 2 forwards. Outputs named in `shared` (e.g. logit_scale) are not per sample:
their cached gradient is pushed through once, with the kept chunk.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.profiler import record_function


class RngState:
    """CPU and accelerator RNG state, captured now and restorable later."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


def split_batch(batch: dict, chunk: int) -> list[dict]:
    n = len(next(iter(batch.values())))
    return [{k: v[i:i + chunk] for k, v in batch.items()} for i in range(0, n, chunk)]


def grad_cache_step(forward: Callable[[dict], dict], loss_fn: Callable[[dict], tuple],
                    batch: dict, chunk: int, backward: Callable[[torch.Tensor, bool], None],
                    shared: Iterable[str] = ()) -> tuple[torch.Tensor, dict]:
    """One gradient-cached forward/backward; the caller steps the optimizer.

    forward(chunk_batch) -> dict of outputs; loss_fn(outputs) -> (loss, metrics) with no
    parameters of its own; backward(surrogate, is_last_backward) runs the engine's backward.
    The three phases are profiler ranges: mmscale/embed, mmscale/loss, mmscale/reforward_backward.
    """
    shared = set(shared)
    chunks = split_batch(batch, chunk)
    last = len(chunks) - 1
    states, outs = [], []
    with record_function("mmscale/embed"):
        with torch.no_grad():
            for c in chunks[:last]:
                states.append(RngState())
                outs.append(forward(c))
        kept = forward(chunks[last])  # with autograd: this chunk is not run again
        outs.append({k: v.detach() for k, v in kept.items()})

    with record_function("mmscale/loss"):
        leaves = {}
        for k in outs[0]:
            v = outs[0][k] if k in shared else torch.cat([o[k] for o in outs])
            leaves[k] = v.detach().float().requires_grad_(True) if v.is_floating_point() else v
        loss, metrics = loss_fn(leaves)
        loss.backward()
        cached = {k: v.grad if v.is_floating_point() else None for k, v in leaves.items()}
        del outs, leaves

    with record_function("mmscale/reforward_backward"):
        rows = [slice(i * chunk, i * chunk + len(next(iter(c.values())))) for i, c in enumerate(chunks)]
        # the kept chunk first, so its activations are gone before any re-forward
        backward(_surrogate(kept, cached, rows[last], shared, with_shared=True), last == 0)
        del kept
        for i, (c, state) in enumerate(zip(chunks[:last], states)):
            state.restore()
            backward(_surrogate(forward(c), cached, rows[i], shared, with_shared=False), i == last - 1)
    return loss.detach(), metrics


def _surrogate(out: dict, cached: dict, rows: slice, shared: set, with_shared: bool) -> torch.Tensor:
    """sum <output, cached gradient> over a chunk's outputs: its backward gives the parameters
    exactly the chunk's share of the loss's gradient."""
    terms = []
    for k, v in out.items():
        if not v.requires_grad or cached[k] is None:
            continue
        if k in shared:
            if with_shared:
                terms.append((v.float() * cached[k]).sum())
        else:
            terms.append((v.float() * cached[k][rows]).sum())
    return torch.stack(terms).sum()


def check_exact(towers: dict) -> None:
    """The gradient cache is exact only for towers whose forward treats samples independently.
    A trainable BatchNorm normalises each chunk by the chunk's own statistics (not the batch's)
    and moves its running statistics once per forward, twice per chunk here: refused up front."""
    from .config import ConfigError
    for name, tower in towers.items():
        norms = [m for m in tower.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 and any(p.requires_grad for p in m.parameters())]
        if norms:
            raise ConfigError(
                f"train.grad_cache_chunk: the {name} tower has {len(norms)} trainable BatchNorm layers, whose batch "
                f"statistics differ per chunk, so the gradient cache would not be exact; set train.grad_cache_chunk=0 "
                f"(or the per-rank batch), freeze the tower (model.{name}.freeze=true), or use a LayerNorm/GroupNorm tower")

"""DeepSpeed from a recipe: the batch per rank, the config dict and the engine around a model."""
from __future__ import annotations

import torch

from ..config import Config, ConfigError


def check_world(cfg: Config, world_size: int) -> tuple[int, int]:
    """Local batch per rank and gradient-cache chunk; raises if they do not divide."""
    t = cfg.train
    if t.global_batch_size % world_size:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not divisible by {world_size} ranks")
    local = t.global_batch_size // world_size
    chunk = t.grad_cache_chunk or local
    if local % chunk:
        raise ConfigError(f"train.grad_cache_chunk: {chunk} does not divide the per-rank batch {local}")
    return local, chunk


def deepspeed_config(cfg: Config, local_batch: int, load_universal: bool = False) -> dict:
    o, t = cfg.optim, cfg.train
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,  # gradient-cache chunks mark the boundary themselves
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        # the dtype gradients cross ranks in; DeepSpeed's default under bf16 is bf16
        "communication_data_type": t.grad_reduce_dtype,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16" and t.zero_stage >= 1:
        # gradients summed over a step's backwards in fp32: ZeRO 1 then takes DeepSpeed's BF16_Optimizer,
        # ZeRO 2-3 keep fp32 gradient partitions. DeepSpeed has no fp32 sum under ZeRO 0: reduction.py's
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if o.grad_clip > 0:
        ds["gradient_clipping"] = o.grad_clip
    if load_universal:  # resuming a checkpoint written by another number of ranks (engine/checkpoint.py)
        ds["checkpoint"] = {"load_universal": True}
    return ds


def optimizer(params, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """torch's Adam (L2 weight decay) or AdamW (decoupled), with torch's fused kernel on CUDA and
    CPU: one pass over each parameter without temporaries, the step count kept on the device
    (on a 2-core CPU 5.6x faster than the multi-tensor version over 300 tensors of 200K, which
    allocates a temporary per operation and tensor). DeepSpeed's ZeRO wraps it as it is."""
    o = cfg.optim
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    fast = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, **fast)


def initialize(model: torch.nn.Module, cfg: Config, local_batch: int, lr_lambda=None, load_universal: bool = False,
               groups: list[dict] | None = None):
    """The DeepSpeed engine over the model's trainable parameters (in the groups of
    engine/param_groups.py: weight decay and LR scale per group); lr_lambda (step -> factor) is
    stepped by DeepSpeed after every optimizer step, None leaves the LR to the caller."""
    import deepspeed
    from ..dist import current_device
    from .param_groups import parameter_groups
    params = groups if groups is not None else parameter_groups(model, cfg.optim)
    scheduler = None if lr_lambda is None else (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(params, cfg, current_device()),
                                      config=deepspeed_config(cfg, local_batch, load_universal),
                                      lr_scheduler=scheduler)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # DeepSpeed's ZeRO-0 reduction flattens every gradient into a buffer, all-reduces it and
        # copies it back even on one rank, where it is the identity: about 2% of a ViT-S/32 step
        # on the CPU. ZeRO 1-3 reduce through their optimizer and keep their path.
        engine.enable_backward_allreduce = False
    return engine


def base_lr(engine) -> float:
    """optim.lr times the schedule's factor now: the first group's LR over its scale."""
    group = base_optimizer(engine).param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer whose param_groups DeepSpeed reads the LR from (ZeRO wraps it)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def place_optimizer_state(opt: torch.optim.Optimizer) -> int:
    """Moves every tensor of the optimizer's state to its parameter's device; returns how many
    moved. A universal checkpoint is loaded on the CPU (ds_to_universal) and torch keeps a loaded
    `step` where it was, while the fused CUDA Adam reads `step` as a device pointer: without this,
    the first step after resuming on another number of GPUs would read host memory on the GPU."""
    moved = 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.device != p.device:
                    state[k], moved = v.to(p.device), moved + 1
    return moved

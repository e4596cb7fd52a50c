"""DeepSpeed from a recipe: the config dict and the engine around a model."""
from __future__ import annotations

import torch

from ..config import Config


def deepspeed_config(cfg: Config, local_batch: int) -> dict:
    o, t = cfg.optim, cfg.train
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,  # gradient-cache chunks mark the boundary themselves
        "optimizer": {"type": "Adam", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            "adam_w_mode": o.name == "adamw",  # DeepSpeed's "Adam" is AdamW unless told otherwise
            "torch_adam": True}},
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if o.grad_clip > 0:
        ds["gradient_clipping"] = o.grad_clip
    return ds


def initialize(model: torch.nn.Module, cfg: Config, local_batch: int, lr_lambda=None):
    """The DeepSpeed engine over the model's trainable parameters; lr_lambda (step -> factor) is
    stepped by DeepSpeed after every optimizer step, None leaves the LR to the caller."""
    import deepspeed
    scheduler = None if lr_lambda is None else (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=deepspeed_config(cfg, local_batch), lr_scheduler=scheduler)
    return engine


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer whose param_groups DeepSpeed reads the LR from (ZeRO wraps it)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)

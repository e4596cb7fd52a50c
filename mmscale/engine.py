"""The one training engine: DeepSpeed setup, the step (plain or gradient-cached), the
schedule, checkpoints with exact resume, metrics, evaluation and export. Tasks supply
the model, loss, data and evaluation (see tasks.py)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import time

import torch
import torch.distributed as dist

from .config import Config, check_world, save_config, to_dict
from .gradcache import grad_cache_step

LATEST = "latest"  # the file name DeepSpeed's load_checkpoint reads
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped at a checkpoint on a signal; rerun the same command to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # Slurm: preemption/scancel/requeue, --signal=USR1@secs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the process group the launcher (deepspeed, torchrun, srun) describes, or make a
    one-process group when run as plain `python`."""
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
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name())


def lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float, step_size: int = 0, gamma: float = 0.1):
    """Linear warmup, then cosine decay to min_ratio (CMLA: Adam 1e-4, cosine), constant, or a
    step decay by gamma every step_size steps (M3CoL's StepLR)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "step":
            return gamma ** ((step - warmup) // step_size)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


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


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Trainer:
    def __init__(self, cfg: Config, task):
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        init_distributed()
        self.cfg, self.task = cfg, task
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_batch, self.chunk = check_world(cfg, self.world)
        self.device = torch.device(get_accelerator().current_device_name())
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.run_dir = cfg.train.run_dir
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        if self.rank == 0:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = task.build_model()
        self.stream = task.train_stream(model, self.rank, self.world)
        t = cfg.train
        self.total_steps = t.steps if t.steps > 0 else t.epochs * self.stream.steps_per_epoch
        o = cfg.optim
        schedule = lr_lambda(o.warmup_steps, self.total_steps, o.schedule, o.min_lr_ratio, o.step_size, o.gamma)
        # DeepSpeed steps its scheduler every step without a metric, so a plateau schedule lives
        # here instead, on the optimizer whose param_groups DeepSpeed reads its LR from
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(cfg, self.local_batch),
            lr_scheduler=None if o.schedule == "plateau" else lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.plateau = None
        if o.schedule == "plateau":
            opt = self.engine.optimizer
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                getattr(opt, "optimizer", opt), mode=o.plateau.mode, factor=o.plateau.factor,
                patience=o.plateau.patience)
        self.step = 0
        self.skipped = 0  # unreadable samples this rank replaced so far
        self.train_loss_sum, self.train_loss_steps = 0.0, 0  # since the last evaluation
        self.best = None  # early stopping: {"value", "step", "metrics", "bad"}
        self.last_eval = (-1, {})  # (step, metrics) of the latest evaluation
        self.stop_signal = 0
        self.saved_step = -1
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop_signal)

    def _on_stop_signal(self, signum, frame) -> None:
        # only a flag: the step in flight (and its collectives) finishes, then every rank
        # checkpoints together at the same step boundary
        self.stop_signal = signum

    def stop_requested(self) -> bool:
        """True on every rank once any rank got a stop signal."""
        flag = torch.tensor([self.stop_signal], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------ step

    def to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, self.dtype if v.is_floating_point() else None, non_blocking=True))
                for k, v in batch.items()}

    def _backward(self, surrogate: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(surrogate)

    def forward_backward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Gradients of the task loss over the whole local batch, accumulated in the engine."""
        def loss_fn(out):
            return self.task.loss(out, batch)
        if self.chunk < self.local_batch:
            return grad_cache_step(self.engine, loss_fn, batch, self.chunk, self._backward,
                                   shared=self.task.shared_outputs)
        loss, metrics = loss_fn(self.engine(batch))
        self._backward(loss, True)
        return loss.detach(), metrics

    def train_step(self, batch: dict) -> tuple[float, dict]:
        # per-step seeding keeps dropout/augmentation/mixup identical across a resume
        torch.manual_seed(hash((self.cfg.train.seed, self.step, self.rank)) % 2 ** 62)
        self.task.set_progress(self.step, self.total_steps)
        self.skipped += int(batch.pop("skipped", 0))
        loss, metrics = self.forward_backward(self.to_device(batch))
        self.engine.step()
        self.step += 1
        loss = loss.float().clone()
        dist.all_reduce(loss)  # the local-loss variant differs per rank; log the global mean
        loss = loss.item() / self.world
        self.train_loss_sum, self.train_loss_steps = self.train_loss_sum + loss, self.train_loss_steps + 1
        return loss, metrics

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        if self.saved_step == self.step:  # e.g. a stop signal right after a periodic checkpoint
            return
        tag = f"step{self.step:08d}"
        client = {"step": self.step, "data": self.stream.state_dict(), "skipped": self.skipped_total(),
                  "best": self.best, "train_loss": [self.train_loss_sum, self.train_loss_steps],
                  "plateau": self.plateau.state_dict() if self.plateau else None}
        self.engine.save_checkpoint(self.ckpt_dir, tag=tag, save_latest=False, client_state=client)
        dist.barrier()
        if self.rank == 0:
            # only a fully written checkpoint becomes `latest`; a kill before this line leaves
            # the previous one in charge
            write_atomic(os.path.join(self.ckpt_dir, LATEST), tag)
            tags = sorted(d for d in os.listdir(self.ckpt_dir) if d.startswith("step") and d != tag)
            for old in tags[:max(0, len(tags) - (self.cfg.train.keep_checkpoints - 1))]:
                shutil.rmtree(os.path.join(self.ckpt_dir, old), ignore_errors=True)
        dist.barrier()
        self.saved_step = self.step

    def maybe_resume(self) -> bool:
        if not (self.cfg.train.resume and os.path.isfile(os.path.join(self.ckpt_dir, LATEST))):
            return False
        path, client = self.engine.load_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        self.step = self.saved_step = client["step"]
        self.stream.load_state_dict(client["data"])
        self.best = client.get("best")
        self.train_loss_sum, self.train_loss_steps = client.get("train_loss", (0.0, 0))
        if self.plateau and client.get("plateau"):
            self.plateau.load_state_dict(client["plateau"])
        # the total so far is carried by rank 0; the other ranks restart their own count
        self.skipped = client.get("skipped", 0) if self.rank == 0 else 0
        self.log({"event": "resumed", "step": self.step, "checkpoint": path})
        return True

    # ------------------------------------------------------------ logging, eval, export

    def skipped_total(self) -> int:
        total = torch.tensor(self.skipped, device=self.device)
        dist.all_reduce(total)
        return int(total)

    def log(self, record: dict) -> None:
        if self.rank == 0:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(self) -> dict:
        metrics = self.task.evaluate(self.engine.module, self.device, self.dtype)
        if self.train_loss_steps:
            metrics["train/loss"] = self.train_loss_sum / self.train_loss_steps
            self.train_loss_sum, self.train_loss_steps = 0.0, 0
        if self.plateau:
            self.plateau.step(self._metric(metrics, self.cfg.optim.plateau.metric, "optim.plateau.metric"))
        if metrics:
            self.log({"step": self.step, **metrics})
        if self.cfg.train.early_stopping.metric:
            self._track_best(metrics)
        self.last_eval = (self.step, metrics)
        return metrics

    @staticmethod
    def _metric(metrics: dict, name: str, key: str) -> float:
        if name not in metrics:
            raise KeyError(f"{key}: the evaluation has no {name!r} (it has: {', '.join(sorted(metrics))})")
        return metrics[name]

    def _track_best(self, metrics: dict) -> None:
        """Early stopping: export on every improvement; count evaluations without one."""
        es = self.cfg.train.early_stopping
        value = self._metric(metrics, es.metric, "train.early_stopping.metric")
        better = self.best is None or (value < self.best["value"] if es.mode == "min" else value > self.best["value"])
        if better:
            self.best = {"value": value, "step": self.step, "metrics": metrics, "bad": 0}
            if self.cfg.train.export:
                self.export()
        else:
            self.best["bad"] += 1

    def early_stop(self) -> bool:
        es = self.cfg.train.early_stopping
        return bool(es.metric) and self.best is not None and self.best["bad"] >= es.patience

    def export(self) -> str | None:
        """Towers + heads as safetensors with a config that rebuilds them offline."""
        import deepspeed
        from safetensors.torch import save_file
        module = self.engine.module
        out = os.path.join(self.run_dir, "export")
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.cfg.train.zero_stage == 3):
            if self.rank == 0:
                os.makedirs(out, exist_ok=True)
                state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in module.state_dict().items()}
                save_file(state, os.path.join(out, "model.safetensors.tmp"))
                os.replace(os.path.join(out, "model.safetensors.tmp"), os.path.join(out, "model.safetensors"))
                self.task.save_export_config(module, out)
        dist.barrier()
        return out if self.rank == 0 else None

    # ------------------------------------------------------------ loop

    def fit(self) -> dict:
        from tqdm import tqdm
        t = self.cfg.train
        self.maybe_resume()
        batches = iter(self.stream)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0, desc="train", dynamic_ncols=True)
        tic, seen = time.perf_counter(), 0
        while self.step < self.total_steps and not self.early_stop():
            loss, metrics = self.train_step(next(batches))
            seen += t.global_batch_size
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - tic
                # task metrics stay tensors until here: no device sync on the steps not logged
                self.log({"step": self.step, "epoch": self.stream.epoch, "loss": loss,
                          "lr": self.engine.get_lr()[0], **{k: float(v) for k, v in metrics.items()},
                          "samples_per_s": seen / elapsed,
                          "skipped_samples": self.skipped_total()})
                tic, seen = time.perf_counter(), 0
            # evaluate first: a checkpoint at the same step then carries what the evaluation
            # changed (best so far, plateau state)
            if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
            if self.step < self.total_steps and self.stop_requested():
                bar.close()
                self.save_checkpoint()
                self.log({"event": "preempted", "step": self.step, "signal": self.stop_signal})
                return {"step": self.step, "preempted": True}
        bar.close()
        self.save_checkpoint()
        # an early stop comes right after an evaluation of this very step: no second one
        last_step, metrics = self.last_eval
        results = {"step": self.step, **(metrics if last_step == self.step else self.evaluate())}
        if t.early_stopping.metric:
            # the export already holds the best evaluation's weights
            results = {"step": self.step, "best_step": self.best["step"], **self.best["metrics"]}
        elif t.export:
            self.export()
        if self.rank == 0:
            write_atomic(os.path.join(self.run_dir, "results.json"), json.dumps(results, indent=2))
        return results

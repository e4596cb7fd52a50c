"""The training loop, the same for every task: set up, then

    for each step: forward + backward (whole local batch, or gradient-cached chunks),
                   optimizer step, log, evaluate, checkpoint, stop on a signal.

Tasks supply the model, data, forward, loss and evaluation (mmscale/tasks); DeepSpeed holds
the model, optimizer and LR schedule (backend.py); everything a resumed run needs is
registered with the Checkpointer (checkpoint.py).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..config import Config, check_world, save_config
from ..dist import barrier, current_device, init_distributed, rank_and_world
from ..export import save_export
from ..files import RunDir, atomic_write_json
from ..gradcache import grad_cache_step
from ..tasks import Progress, Task
from . import backend
from .checkpoint import Checkpointer
from .logger import MetricsLogger
from .schedule import EarlyStopping, Plateau, step_lr_lambda
from .state import SkipCounter, StopSignals, TrainState

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped at a checkpoint on a signal; rerun the same command to continue


class Trainer:
    def __init__(self, cfg: Config, task: Task):
        init_distributed()
        self.cfg, self.task, t = cfg, task, cfg.train
        self.rank, self.world = rank_and_world()
        self.local_batch, self.chunk = check_world(cfg, self.world)
        self.device = current_device()
        self.dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
        self.run = RunDir(t.run_dir)
        self.logger = task.logger = MetricsLogger.for_run(self.run, self.rank)  # + tensorboard/

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = task.build_model()
        if self.rank == 0:  # after build_model: the task has filled in what the data decides
            save_config(cfg, self.run.config)
        self.stream = task.train_stream(model, self.rank, self.world)
        self.total_steps = t.steps if t.steps > 0 else t.epochs * self.stream.steps_per_epoch
        self.engine = backend.initialize(model, cfg, self.local_batch, step_lr_lambda(cfg.optim, self.total_steps))

        self.state, self.skipped = TrainState(), SkipCounter(self.device)
        self.early = EarlyStopping(t.early_stopping)
        self.plateau = Plateau(cfg.optim.plateau, backend.base_optimizer(self.engine)) \
            if cfg.optim.schedule == "plateau" else None
        self.checkpoints = Checkpointer(self.run, self.engine, t.keep_checkpoints)
        for name, obj in (("train", self.state), ("data", self.stream), ("skipped", self.skipped),
                          ("early_stopping", self.early), ("plateau", self.plateau)):
            if obj is not None:
                self.checkpoints.register(name, obj)
        self.stop = StopSignals(self.device)
        self.last_eval = (-1, {})  # (step, metrics) of the latest evaluation

    # ------------------------------------------------------------ one step

    def to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, self.dtype if v.is_floating_point() else None, non_blocking=True))
                for k, v in batch.items()}

    def _backward(self, surrogate: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(surrogate)

    def forward_backward(self, batch: dict, progress: Progress) -> tuple[torch.Tensor, dict]:
        """Gradients of the task loss over the whole local batch, accumulated in the engine."""
        def forward(b):
            return self.task.forward(self.engine, b, progress)

        def loss_fn(out):
            return self.task.loss(out, batch, progress)
        if self.chunk < self.local_batch:
            return grad_cache_step(forward, loss_fn, batch, self.chunk, self._backward,
                                   shared=self.task.shared_outputs)
        loss, metrics = loss_fn(forward(batch))
        self._backward(loss, True)
        return loss.detach(), metrics

    def train_step(self, batch: dict) -> tuple[float, dict]:
        # per-step seeding keeps dropout/augmentation/mixup identical across a resume
        torch.manual_seed(hash((self.cfg.train.seed, self.state.step, self.rank)) % 2 ** 62)
        self.skipped.add(int(batch.pop("skipped", 0)))
        loss, metrics = self.forward_backward(self.to_device(batch), Progress(self.state.step, self.total_steps))
        self.engine.step()
        self.state.step += 1
        loss = loss.float().clone()
        dist.all_reduce(loss)  # the local-loss variant differs per rank; log the global mean
        loss = loss.item() / self.world
        self.state.add_loss(loss)
        return loss, metrics

    # ------------------------------------------------------------ evaluation and export

    def evaluate(self) -> dict:
        step = self.state.step
        metrics = {**self.task.evaluate(self.engine.module, self.device, self.dtype), **self.state.pop_mean_loss()}
        if self.plateau:
            self.plateau.update(metrics)
        if metrics:
            self.logger.log({"step": step, **metrics})
        if self.early.enabled and self.early.update(step, metrics) and self.cfg.train.export:
            self.export()  # the export always holds the best evaluation's weights
        self.last_eval = (step, metrics)
        return metrics

    def export(self) -> None:
        import deepspeed
        module = self.engine.module
        # ZeRO-3 partitions every parameter over the ranks: gather them to write them whole
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None,
                                               enabled=self.cfg.train.zero_stage == 3):
            if self.rank == 0:
                save_export(module, self.cfg, self.run.export)
        barrier()

    # ------------------------------------------------------------ the loop

    def _due(self, every: int) -> bool:
        return every > 0 and self.state.step % every == 0

    def fit(self) -> dict:
        t = self.cfg.train
        if t.resume and (path := self.checkpoints.resume()):
            self.logger.log({"event": "resumed", "step": self.state.step, "checkpoint": path})
        batches = iter(self.stream)
        bar = self.logger.progress(self.total_steps, self.state.step)  # shows the logged records
        tic, seen = time.perf_counter(), 0
        while self.state.step < self.total_steps and not self.early.should_stop:
            loss, metrics = self.train_step(next(batches))
            seen += t.global_batch_size
            bar.step()
            step, last = self.state.step, self.state.step == self.total_steps
            if self._due(t.log_every) or last:
                # task metrics stay tensors until here: no device sync on the steps not logged
                self.logger.log({"step": step, "epoch": self.stream.epoch, "loss": loss,
                                 "lr": self.engine.get_lr()[0], **{k: float(v) for k, v in metrics.items()},
                                 "samples_per_s": seen / (time.perf_counter() - tic),
                                 "skipped_samples": self.skipped.total()})
                tic, seen = time.perf_counter(), 0
            if last:
                break
            # evaluate first: a checkpoint at the same step then carries what the evaluation
            # changed (best so far, plateau state)
            if self._due(t.eval_every):
                self.evaluate()
            if self._due(t.checkpoint_every):
                self.checkpoints.save(step)
            if self.stop.requested():
                bar.close()
                self.checkpoints.save(step)
                self.logger.log({"event": "preempted", "step": step, "signal": self.stop.received})
                return {"step": step, "preempted": True}
        bar.close()
        self.checkpoints.save(self.state.step)
        return self.finish()

    def finish(self) -> dict:
        """results.json: the final evaluation, or with early stopping the best one (whose
        weights the export already holds)."""
        step, (eval_step, metrics) = self.state.step, self.last_eval
        # an early stop comes right after an evaluation of this very step: no second one
        results = {"step": step, **(metrics if eval_step == step else self.evaluate())}
        if self.early.enabled:
            best = self.early.best
            results = {"step": step, "best_step": best["step"], **best["metrics"]}
        elif self.cfg.train.export:
            self.export()
        if self.rank == 0:
            atomic_write_json(self.run.results, results)
        return results

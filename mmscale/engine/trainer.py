"""The training loop, the same for every task: set up, then

    for each step: forward + backward (whole local batch, or gradient-cached chunks),
                   optimizer step, log, evaluate, checkpoint, stop on a signal.

Tasks supply the model, data, forward, loss and evaluation (mmscale/tasks); DeepSpeed holds
the model, optimizer and LR schedule (backend.py); one step is step.py; everything a resumed
run needs is registered with the Checkpointer (checkpoint.py). The loop reads values back from
the device only on the steps it logs.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch

from ..config import Config, ConfigError, save_config
from .backend import check_world
from ..data.batches import to_device
from ..dist import current_device, init_distributed, on_rank0, rank_and_world
from ..export import save_export
from ..export.openclip import blocker as open_clip_blocker
from ..gradcache import check_exact
from ..files import RunDir, atomic_write_json
from ..seeds import seed_torch
from ..tasks import Progress, Task
from . import backend
from .checkpoint import CheckpointError, Checkpointer
from .ema import WeightEMA
from .logger import MetricsLogger, SampleLog
from .param_groups import GroupSettings, describe as describe_groups, parameter_groups
from .schedule import EarlyStopping, Plateau, step_lr_lambda
from .state import SkipCounter, StopSignals, TrainState
from .step import StepResult, TrainStep
from .watchdog import RankWatchdog

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped at a checkpoint on a signal; rerun the same command to continue


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row): one line for the user."""


class Trainer:
    def __init__(self, cfg: Config, task: Task):
        if cfg.train.export and cfg.train.export_format == "open_clip" and (reason := open_clip_blocker(cfg)):
            raise ConfigError(reason)  # now, not after the run
        init_distributed(cfg.train.dist_timeout_s)
        self.cfg, self.task, t = cfg, task, cfg.train
        self.rank, self.world = rank_and_world()
        self.local_batch, self.chunk = check_world(cfg, self.world)
        self.device = current_device()
        self.dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
        self.run = RunDir(t.run_dir)
        self.logger = task.logger = MetricsLogger.for_run(self.run, self.rank)  # + tensorboard/
        # from here on a lost rank is named, also while rank 0 alone converts a checkpoint (on_rank0)
        self.watchdog = RankWatchdog(self.rank, self.world, t.dist_timeout_s,
                                     on_lost=lambda line: self.logger.log({"event": "rank_lost", "message": line}))
        self.watchdog.start()

        seed_torch("init", t.seed)  # identical initial weights on every rank
        model = task.build_model()
        if self.chunk < self.local_batch:
            check_exact(model.named_towers())
        if self.rank == 0:  # after build_model: the task has filled in what the data decides
            save_config(cfg, self.run.config)
        if t.compile:
            for tower in model.named_towers().values():
                tower.compile(backend=t.compile_backend)
        self.stream = task.train_stream(model, self.rank, self.world)
        self.total_steps = t.steps if t.steps > 0 else t.epochs * self.stream.steps_per_epoch
        self.checkpoints = Checkpointer(self.run, t.keep_checkpoints, t.on_checkpoint_error)
        groups = parameter_groups(model, cfg.optim)
        universal = t.resume and self.checkpoints.prepare_resume(self.world, t.zero_stage, len(groups))
        self.logger.log({"event": "param_groups", "groups": describe_groups(groups)})  # no step: not yet training
        self.engine = backend.initialize(model, cfg, self.local_batch, step_lr_lambda(cfg.optim, self.total_steps),
                                         load_universal=universal, groups=groups)
        self.checkpoints.attach(self.engine)
        self.step_fn = TrainStep(self.engine, task, self.local_batch, self.chunk, t.grad_cache_reduce, self.dtype)

        self.ema = WeightEMA(self.engine.module, t.ema.decay) if t.ema.decay else None
        self.state, self.skipped = TrainState(self.device), SkipCounter()
        self.early = EarlyStopping(t.early_stopping)
        self.plateau = Plateau(cfg.optim.plateau, backend.base_optimizer(self.engine)) \
            if cfg.optim.schedule == "plateau" else None
        for name, obj in (("train", self.state), ("data", self.stream), ("skipped", self.skipped),
                          ("early_stopping", self.early), ("plateau", self.plateau),
                          ("param_groups", GroupSettings(backend.base_optimizer(self.engine))), ("ema", self.ema)):
            if obj is not None:
                self.checkpoints.register(name, obj)
        self.stop = StopSignals()
        self.sample_log = SampleLog(self.run.samples(self.rank) if t.sample_log else None)
        self.last_eval = (-1, {})  # (step, metrics) of the latest evaluation

    # ------------------------------------------------------------ one step

    def to_device(self, batch: dict) -> dict:
        """The batch on the device, its images still uint8: the step normalises them chunk by chunk."""
        return to_device(batch, self.device, self.dtype, images="uint8")

    def train_step(self, batch: dict) -> StepResult:
        # per-step seeding keeps dropout/augmentation/mixup identical across a resume
        seed_torch("step", self.cfg.train.seed, self.state.step, self.rank)
        self.skipped.add(int(batch.pop("skipped", 0)))
        result = self.step_fn(self.to_device(batch), Progress(self.state.step, self.total_steps))
        self.state.step += 1
        if result.applied:
            self.state.add_loss(result.loss)  # on the device: nothing read back
            if self.ema:
                self.ema.update()
        else:
            self.nonfinite_step(result)
        return result

    def nonfinite_step(self, result: StepResult) -> None:
        """A step whose gradients were not finite (no weight changed): counted, logged with the
        loss terms that were not finite; after train.max_nonfinite_steps in a row, training stops
        (nothing is saved, so checkpoints/latest stays the last complete checkpoint). Its values
        are read here: the optimizer's own check already waited for them."""
        terms = [k for k, v in {"loss": result.loss, **result.metrics}.items() if not math.isfinite(float(v))]
        run = self.state.count_nonfinite()
        self.logger.log({"event": "nonfinite", "step": self.state.step, "terms": terms + ["gradients"],
                         "in_a_row": run, "update": "skipped"})
        limit = self.cfg.train.max_nonfinite_steps
        if run >= limit:
            raise TrainingError(
                f"{run} steps in a row (up to step {self.state.step}) had non-finite gradients "
                f"({', '.join(terms + ['gradients'])}), train.max_nonfinite_steps={limit}; checkpoints/latest is the "
                f"last complete checkpoint ({self.checkpoints.latest() or 'none'}): lower optim.lr, set "
                f"optim.grad_clip, or check the data, then rerun")

    def check_unreadable(self, skipped: int) -> None:
        """Stops the run (every rank: the count is summed over them) once the unreadable samples
        replaced so far pass data.max_unreadable of all the samples read."""
        bound, read = self.cfg.data.max_unreadable, self.state.step * self.cfg.train.global_batch_size + skipped
        if skipped > bound * read:
            raise ConfigError(f"data.max_unreadable: {skipped} of the {read} samples read up to step {self.state.step} "
                              f"({skipped / read:.1%}) were unreadable, more than {bound:g}: repair or remove what "
                              f"the lines above name (mmscale-curate keeps only what decodes), or raise the bound")

    def step_record(self, result: StepResult, seconds: float, samples: int) -> dict:
        """What a logged step reports; the one place a step's values come back to the host."""
        return {"step": self.state.step, "epoch": self.stream.epoch,
                "loss": self.state.global_mean(result.loss), "lr": backend.base_lr(self.engine),
                **{k: float(v) for k, v in result.metrics.items()}, "samples_per_s": samples / seconds,
                "skipped_samples": self.skipped.total(), "nonfinite_steps": self.state.nonfinite_total(),
                **self.stream.metrics()}

    # ------------------------------------------------------------ evaluation and export

    def evaluate(self) -> dict:
        step = self.state.step
        with self._ema_weights(self.cfg.train.ema.evaluate):
            scores = self.task.evaluate(self.engine.module, self.device, self.dtype)
        metrics = {**scores, **self.state.pop_mean_loss()}
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
                                               enabled=self.cfg.train.zero_stage == 3), \
                self._ema_weights(self.cfg.train.ema.export):
            on_rank0(save_export, module, self.cfg, self.run.export)

    def _ema_weights(self, wanted: bool):
        """The model with the weight EMA in it (train.ema.evaluate / export), else as it is."""
        return self.ema.swapped_in(wanted) if self.ema else contextlib.nullcontext()

    # ------------------------------------------------------------ the loop

    def fit(self) -> dict:
        try:
            return self._fit()
        except (TrainingError, CheckpointError):
            raise
        except RuntimeError as e:  # a collective failed: name the rank that is gone, if one is
            self.watchdog.explain(e)
            raise
        finally:
            self.watchdog.stop()
            self.logger.close()  # the progress bar, then TensorBoard's writer

    def _fit(self) -> dict:
        t = self.cfg.train
        if t.resume and (path := self.checkpoints.resume()):
            # each group's LR and weight decay as loaded: the schedule's, scaled per group
            groups = [{"lr": g["lr"], "weight_decay": g["weight_decay"]}
                      for g in backend.base_optimizer(self.engine).param_groups]
            self.logger.log({"event": "resumed", "step": self.state.step, "checkpoint": path, "groups": groups})
        batches = iter(self.stream)
        bar = self.logger.progress(self.total_steps, self.state.step)  # shows the logged records
        tic, seen = time.perf_counter(), 0
        while self.state.step < self.total_steps and not self.early.should_stop:
            result = self.train_step(next(batches))
            self.sample_log.write(self.state.step, self.stream.last_ids)
            seen += t.global_batch_size
            bar.step()
            step = self.state.step
            if self.itstime(t.log_every, last=True):
                record = self.step_record(result, time.perf_counter() - tic, seen)
                self.logger.log(record)
                self.check_unreadable(record["skipped_samples"])
                tic, seen = time.perf_counter(), 0
            if step == self.total_steps:
                break  # finish() evaluates and checkpoints the last step
            # evaluate first: a checkpoint at the same step then carries what the evaluation
            # changed (best so far, plateau state)
            if self.itstime(t.eval_every):
                self.evaluate()
            if self.itstime(t.checkpoint_every):
                self.checkpoints.save(step)
            if self.stop.requested():  # every rank got the same answer, a step after the signal
                self.checkpoints.save(step, final=True)
                self.logger.log({"event": "preempted", "step": step, "signal": self.stop.received})
                return {"step": step, "preempted": True}
        return self.finish()

    def itstime(self, every: int, last: bool = False) -> bool:
        """Is the step just done one of every `every` steps (0: never), or with `last`, the last
        one? (big_vision's itstime.)"""
        step = self.state.step
        return (every > 0 and step % every == 0) or (last and step == self.total_steps)

    def finish(self) -> dict:
        """The end of training, one decision a line; results.json holds what it returns."""
        step, (eval_step, metrics) = self.state.step, self.last_eval
        if eval_step != step:  # an early stop comes right after an evaluation of this very step
            metrics = self.evaluate()
        self.checkpoints.save(step, final=True)  # after the evaluation: it carries what that changed
        if self.early.enabled:  # the best evaluation, whose weights the export already holds
            results = {"step": step, "best_step": self.early.best["step"], **self.early.best["metrics"]}
        else:
            results = {"step": step, **metrics}
            if self.cfg.train.export:
                self.export()
        if self.rank == 0:
            atomic_write_json(self.run.results, results)
        return results

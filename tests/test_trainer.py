"""The Trainer in this process, on one rank, with a fake task whose evaluations are scripted: the
order of evaluations and checkpoints, early stopping, the final results and results.json, and
the logger closed at the end. Every other engine test goes through the launcher; this one reads
the loop's decisions directly."""
import json
import os
import signal

import pytest
import torch
from torch.utils.data import default_collate

from conftest import tiny_model_config
from helpers import records
from mmscale.data.batches import BatchStream
from mmscale.tasks import Task


class Points(torch.utils.data.Dataset):
    """y = 2x + 1 with noise, indexed as the engine's streams index: (seed, epoch, i)."""

    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, generator=g)
        self.y = 2 * self.x + 1 + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        i = key[2]
        return {"x": self.x[i], "y": self.y[i]}


class Line(torch.nn.Linear):
    def __init__(self):
        super().__init__(1, 1)

    def named_towers(self) -> dict:
        return {}


class ScriptedTask(Task):
    """Evaluations return the next of `val_losses` and note the step; checkpoints are noted too."""

    def __init__(self, cfg, val_losses):
        super().__init__(cfg)
        self.val_losses, self.calls, self.trainer = list(val_losses), [], None

    def build_model(self):
        return Line()

    def train_stream(self, model, rank, world):
        return BatchStream(Points(), default_collate, self.cfg.train.global_batch_size, rank, world,
                           seed=self.cfg.train.seed)

    def forward(self, model, batch, progress):
        return {"pred": model(batch["x"])}

    def loss(self, out, batch, progress):
        return torch.nn.functional.mse_loss(out["pred"], batch["y"]), {}

    def evaluate(self, model, device, dtype):
        self.calls.append(("evaluate", self.trainer.state.step))
        return {"val/loss": self.val_losses.pop(0)}


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank process group in this process for the module's Trainers (DeepSpeed keeps its
    groups for the process's life: one group serves them all), taken down afterwards with the
    signal handlers and the environment the Trainer set (later tests launch subprocesses from
    this environment)."""
    env, handlers = dict(os.environ), {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)
    for s, h in handlers.items():
        signal.signal(s, h)


def train(run_dir, val_losses, *overrides):
    from mmscale.engine import Trainer
    cfg = tiny_model_config(**{"train.run_dir": run_dir, "train.global_batch_size": 8, "train.grad_cache_chunk": 0,
                               "train.export": "false", "train.log_every": 1, "train.eval_every": 2,
                               "train.checkpoint_every": 2, "train.steps": 8, "train.precision": "fp32",
                               "train.zero_stage": 0, "optim.lr": 0.1, "optim.warmup_steps": 0,
                               **dict(o.split("=", 1) for o in overrides)})
    task = ScriptedTask(cfg, val_losses)
    trainer = Trainer(cfg, task)
    task.trainer = trainer
    save, close = trainer.engine.save_checkpoint, trainer.logger.close

    def noted_save(folder, tag, **kwargs):  # what reaches DeepSpeed: a repeated save of one step does not
        task.calls.append(("checkpoint", int(tag[len("step"):])))
        return save(folder, tag=tag, **kwargs)

    def noted_close():
        task.calls.append(("close", trainer.state.step))
        close()
    trainer.engine.save_checkpoint, trainer.logger.close = noted_save, noted_close
    return trainer, task, trainer.fit()


def test_the_loop_evaluates_then_checkpoints_and_returns_the_final_evaluation(one_rank, tmp_path):
    run_dir = str(tmp_path / "run")
    trainer, task, results = train(run_dir, [4.0, 3.0, 2.0, 1.0])
    # evaluate before the checkpoint of the same step, which then carries what it changed; the
    # last step is evaluated once, by finish(), and checkpointed after it
    assert task.calls == [("evaluate", 2), ("checkpoint", 2), ("evaluate", 4), ("checkpoint", 4),
                          ("evaluate", 6), ("checkpoint", 6), ("evaluate", 8), ("checkpoint", 8), ("close", 8)]
    assert results["step"] == 8 and results["val/loss"] == 1.0 and results["train/loss"] > 0
    assert json.load(open(os.path.join(run_dir, "results.json"))) == results
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == "step00000008"
    losses = [r["loss"] for r in records(run_dir) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] / 2  # it trains: the line is learnt
    assert trainer.logger._writer is None and os.listdir(os.path.join(run_dir, "tensorboard"))  # written, closed


def test_early_stopping_ends_after_patience_and_reports_the_best_evaluation(one_rank, tmp_path):
    run_dir = str(tmp_path / "run")
    trainer, task, results = train(run_dir, [4.0, 2.0, 2.5, 3.0, 9.0], "train.early_stopping.metric=val/loss",
                                   "train.early_stopping.patience=2", "train.steps=20")
    # the best is step 4; steps 6 and 8 do not improve on it, so training ends at 8 without a
    # second evaluation or checkpoint of step 8
    assert task.calls == [("evaluate", 2), ("checkpoint", 2), ("evaluate", 4), ("checkpoint", 4),
                          ("evaluate", 6), ("checkpoint", 6), ("evaluate", 8), ("checkpoint", 8), ("close", 8)]
    assert results == {"step": 8, "best_step": 4, **trainer.early.best["metrics"]} and results["val/loss"] == 2.0
    assert json.load(open(os.path.join(run_dir, "results.json"))) == results
    assert trainer.state.step == 8 and task.val_losses == [9.0]
    # the final checkpoint carries what the final evaluation changed: the training-loss window it
    # consumed (back to 0 steps) and the early-stopping record of it
    state = torch.load(os.path.join(run_dir, "checkpoints", "step00000008", "mp_rank_00_model_states.pt"),
                       map_location="cpu", weights_only=False)
    assert state["train"]["loss_steps"] == 0 and state["early_stopping"]["best"]["bad"] == 2
    assert state["early_stopping"]["best"]["step"] == 4

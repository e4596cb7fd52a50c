"""What the engine trains: a task gives the model, the data, the forward and a parameter-free
loss over the model's outputs, and its evaluation; the engine does everything else (DeepSpeed,
gradient cache, schedule, checkpoints, logging, export).

Contract, so the gradient cache can wrap any task:
- forward(model, batch, progress) returns a dict of tensors, each per sample (leading dim =
  batch) except the names listed in `shared_outputs` (e.g. the logit scale);
- loss(outputs, batch, progress) -> (scalar loss, metrics) uses only those outputs and the
  batch's labels, never model parameters; metrics are scalar tensors (read only on logged steps).
Tasks write no file themselves: what they report goes through `self.logger` (the engine's, rank 0).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, image_size
from ..eval import resolve_templates, run_evaluations, zeroshot_eval
from ..models.layers import eval_mode


@dataclass(frozen=True)
class Progress:
    """Where training stands when a step runs (schedules inside a loss read it)."""
    step: int
    total_steps: int


class NullLogger:
    def log(self, record: dict) -> None:
        pass


class Task:
    shared_outputs: tuple = ()

    def __init__(self, cfg: Config, logger=None):
        self.cfg = cfg
        self.logger = logger or NullLogger()

    def build_model(self):
        """The model; may fill what the recipe left to the data (e.g. the number of classes) into
        self.cfg first, so the config the engine saves afterwards rebuilds this very model."""
        raise NotImplementedError

    def train_stream(self, model, rank: int, world: int):
        """An endless iterator of this rank's batches with state_dict/load_state_dict (resume)."""
        raise NotImplementedError

    def forward(self, model, batch: dict, progress: Progress) -> dict:
        return model(batch)

    def loss(self, out: dict, batch: dict, progress: Progress):
        raise NotImplementedError

    def evaluate(self, model, device, dtype) -> dict:
        """Metrics of the model as it is now; every rank calls it and gets the same numbers."""
        raise NotImplementedError


def image_text_evaluation(cfg: Config, model, heldout, classnames, device, dtype) -> dict:
    """Zero-shot top-1/top-5 on a held-out labelled split (when there is one) plus the eval.*
    data sets (zero-shot, retrieval, linear probe), for any model with encode_image/encode_text.
    Every rank calls it: evaluation shards the images over the ranks and all-gathers the
    embeddings, so every rank runs the same forwards."""
    e, size = cfg.eval, image_size(cfg.model)
    metrics = {}
    with eval_mode(model):
        if e.zeroshot and heldout and classnames:
            metrics.update({f"zeroshot/{k}": v for k, v in zeroshot_eval(
                model, heldout, classnames, resolve_templates(e.templates), size, device, dtype,
                e.batch_size).items()})
        extra, _ = run_evaluations(
            model, {"zeroshot": e.zeroshot_datasets, "retrieval": e.retrieval_datasets, "linear_probe": e.linear_probe},
            templates=e.templates, image_size=size, device=device, dtype=dtype, max_per_class=e.max_per_class,
            max_images=e.max_images, retrieval_k=e.retrieval_k, batch_size=e.batch_size)
    return {**metrics, **extra}

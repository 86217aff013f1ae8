"""Training objectives. A task owns what a batch is trained for: host batch -> device batch
(augmentations that run on the device), batch -> loss, its evaluation and the one-line summary of
that evaluation, and its own random state (saved with each rank's RNG states).

A task class also answers the run's questions that depend on the objective, so that the trainer
never branches on the task name: `build_model(spec, from_checkpoint)` (the model, with
`model.pretrained` loaded unless resuming), `backbone_prefix` (where the backbone's parameter
names start, for swinv2.param_groups), `export_file` (the run's export; swinv2_train.checkpoint
picks the format from the weights' keys), `labels` (whether the data stream reads class labels; a
task without them gives the stream its `stream_masks(spec)`), and per instance optional
`train_metrics()` (merged into the log at log steps, mean over ranks) and
`after_step(step, model, logger)` (e.g. SimMIM's reconstruction pictures).

Its settings are a dataclass, the class's `Config` (defaults, and an optional `check(model_config)`
raising ValueError naming the key); swinv2_train.config registers each under the `task` config
group by its name, so `task=<name>` selects it. A new objective is a new module here and one entry
in TASKS; the trainer and the config tree do not change.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Protocol

import torch

from ..distributed import all_reduce_sum
from .classification import ClassificationTask
from .simmim import SimMIMTask


class Task(Protocol):
    name: str
    export_file: str  # the run's export (a swinv2_train.rundir name)

    def batch(self, images: torch.Tensor, targets: torch.Tensor) -> Any:
        """A loader batch -> what `loss` takes (on the device)."""

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Scalar fp32 loss of `model` on `batch`."""

    def evaluate(self, model: torch.nn.Module) -> Dict[str, float]:
        """Validation metrics (collective: every rank calls it and gets the totals)."""

    def describe(self, metrics: Dict[str, float]) -> str:
        """One line for the log."""

    def rng_state(self) -> Dict[str, Any]:
        """The task's random state (stored in rng_rank{r}.pt next to the RNG states)."""

    def set_rng_state(self, state: Dict[str, Any]) -> None: ...


TASKS: Dict[str, Callable[..., Task]] = {"classification": ClassificationTask, "simmim": SimMIMTask}


def task_class(spec) -> Any:
    """The class of the run's task (its static answers: build_model, export_file, ...). The
    trainer looks it up once (build_trainer) and hands its answers on."""
    return TASKS[spec.task.name]


def build_task(spec, env) -> Task:
    """The run's task on this rank (a shorthand for tools and tests: the trainer has the class)."""
    return task_class(spec)(spec, env)


def reduced_train_metrics(task: Task) -> Dict[str, float]:
    """The task's own training metrics since the last log step, mean over ranks (collective: every
    rank calls it at the same steps; every rank has seen the same number of micro-batches)."""
    own = getattr(task, "train_metrics", None)
    if own is None:
        return {}
    metrics = own()
    keys = sorted(metrics)
    if not keys:
        return {}
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return dict(zip(keys, (v / world for v in all_reduce_sum([metrics[k] for k in keys]))))


__all__ = ["Task", "TASKS", "task_class", "build_task", "reduced_train_metrics", "ClassificationTask", "SimMIMTask"]

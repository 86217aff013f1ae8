"""Training objectives. A task owns what a batch is trained for: host batch -> device batch
(augmentations that run on the device), batch -> loss, its evaluation and the one-line summary of
that evaluation, and its own random state (saved with each rank's RNG states).

A new objective (e.g. SimMIM) is a new module here, one entry in TASKS and a config group file
configs/task/<name>.yaml (`task=<name>`); the trainer does not change.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Protocol

import torch

from swinv2_train.tasks.classification import ClassificationTask


class Task(Protocol):
    name: str

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


TASKS: Dict[str, Callable[..., Task]] = {"classification": ClassificationTask}


def build_task(spec, env) -> Task:
    return TASKS[spec.task.name](spec, env)


__all__ = ["Task", "TASKS", "build_task", "ClassificationTask"]

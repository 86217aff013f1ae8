"""The run spec: the composed Hydra config resolved once, into typed, immutable parts.

    spec = resolve_spec(cfg, world_size)      # validation = building it; errors name the key

Everything downstream takes parts of the spec, never the raw config: `spec.model` (the model's
SwinV2Config) -> swinv2.SwinTransformerV2; `spec` -> parallelize (DeepSpeed config, optimizer);
`spec.data` (sources resolved: shards, sample counts, classes) -> the loaders; `spec.batch` (global,
micro, accumulation); `spec.schedule` (step budget, warmup, effective learning rates); `spec.task`
-> swinv2_train.tasks. `spec.config` is the resolved tree as saved to the run dir's config.yaml
and every checkpoint (resume checks compare it).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf

from swinv2.config import SwinV2Config
from .config import (ConfigError, DeepSpeedSection, LoggerConfig, OptimConfig, RunConfig, Schedule,
                     TrainLoopConfig, _fail)
from .data.config import DataConfig, as_data_config
from .data.sources import check_sources, resolve_sources
from .distributed import launch_world_size
from .tasks import TASKS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchGeometry:
    """global batch (per optimizer step, all ranks) = micro x accum x world_size."""

    global_batch: int
    accum: int
    world_size: int
    eval_batch: int  # per rank

    @property
    def micro(self) -> int:
        return self.global_batch // (self.world_size * self.accum)

    @property
    def micro_global(self) -> int:
        """Samples per micro-step over all ranks."""
        return self.micro * self.world_size


@dataclass(frozen=True)
class RunSpec:
    run: RunConfig
    run_dir: str                      # absolute
    train: TrainLoopConfig            # loop options: cadences, NaN policy, precision, ...
    variant: str
    model: SwinV2Config               # the model, num_classes included
    pretrained: Optional[str]
    pretrained_class_map: Optional[str]
    data: DataConfig                  # sources resolved (unless resolve_spec(resolve_data=False))
    batch: BatchGeometry
    schedule: Schedule
    optim: OptimConfig
    deepspeed: DeepSpeedSection
    logger: LoggerConfig
    task: Any                         # the task's own config (swinv2_train.tasks: TASKS[name].Config)
    config: Dict[str, Any]            # the resolved tree (class count included): config.yaml

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


# ----------------------------------------------------------------------------- resolve
def resolve_spec(cfg: DictConfig, world_size: Optional[int] = None, *, resolve_data: bool = True) -> RunSpec:
    """The run spec of a composed config for `world_size` ranks (default: the launcher's): each
    component validates itself (swinv2_train.config), then what spans components is checked here.
    Raises ConfigError naming the key. `resolve_data=False` checks the data keys without reading
    any file (_info.json, shard lists): for config checks before a run."""
    world = launch_world_size() if world_size is None else world_size
    c = OmegaConf.to_object(cfg)  # the typed components
    train = _train_options(c.train).validate(world)
    optim = c.optim.validate()
    sched = c.sched.validate(optim)
    data = _data(cfg.data, resolve_data)
    model = c.model.validate().build(data.num_classes or 1)  # null classes: known once resolved
    _check_checkpointing_stages(train, model)
    run = c.run.validate()
    task = _task(c.task, model)
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["data"]["num_classes"] = data.num_classes
    return RunSpec(
        run=run, run_dir=os.path.abspath(run.dir), train=train, variant=c.model.variant, model=model,
        pretrained=c.model.pretrained, pretrained_class_map=c.model.pretrained_class_map, data=data,
        batch=BatchGeometry(train.batch_size, train.grad_accum, world,
                            train.eval_batch_size or train.batch_size // (world * train.grad_accum)),
        schedule=sched.build(optim, train), optim=optim, deepspeed=c.deepspeed.validate(),
        logger=c.logger.validate(), task=task, config=saved)


def _train_options(t: TrainLoopConfig) -> TrainLoopConfig:
    if t.amp_every is not None:  # the old name of probe_every
        log.warning("train.amp_every is deprecated: it is train.probe_every now (amplitude probes)")
        t = dataclasses.replace(t, probe_every=t.amp_every, amp_every=None)
    return t


def _check_checkpointing_stages(t: TrainLoopConfig, model: SwinV2Config) -> None:
    for st in t.activation_checkpointing.stages or []:
        if not 0 <= st < model.num_stages:
            _fail("train.activation_checkpointing.stages", f"stage {st} outside 0..{model.num_stages - 1}")


def _data(node: DictConfig, resolve: bool) -> DataConfig:
    """The data package checks its own fields and the choice of source (data.root, shard patterns
    or the synthetic set); with `resolve`, the sources are read once (_info.json, shard lists,
    class count) and the loaders of every epoch read nothing but the shards."""
    try:
        data = check_sources(as_data_config(node).validate())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for which in ("train", "val"):  # the user's own config (the loaders re-resolve a resolved one)
        if data.root is not None and getattr(data, f"{which}_shards") is not None:
            log.info("data.%s_shards is set: it is used instead of data.root for the %s split", which, which)
    return resolve_sources(data) if resolve else data


def _task(task: Any, model: SwinV2Config) -> Any:
    """The task's own settings, checked against the model (e.g. SimMIM's mask geometry); its
    messages name the key."""
    if task.name not in TASKS or not isinstance(task, TASKS[task.name].Config):
        _fail("task.name", f"{task.name!r}: select a task with task=NAME, one of {'|'.join(TASKS)}")
    check = getattr(task, "check", None)
    try:
        if check is not None:
            check(model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return task

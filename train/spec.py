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
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf

import swinv2
from swinv2.config import SwinV2Config
from .config import (TASKS, ConfigError, DeepSpeedSection, LoggerConfig, OptimConfig, RunConfig,
                                 TaskConfig, TrainLoopConfig, model_config)
from .data.config import DataConfig, as_data_config
from .data.sources import check_sources, resolve_sources
from .allocator import CPU_MALLOC_POLICIES
from .distributed import launch_world_size

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
NAN_POLICIES = ("skip", "fail")


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"{key}: {msg}")


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
class Schedule:
    """Step budget and learning rates (already scaled by global batch / optim.lr_batch_ref)."""

    max_steps: Optional[int]
    epochs: Optional[float]
    warmup_steps: Optional[int]
    warmup_epochs: Optional[float]
    lr: float
    warmup_lr: float
    min_lr: float

    @property
    def budget(self) -> tuple[str, Any]:
        """The key that sets the step budget, and its value (for messages)."""
        return ("train.max_steps", self.max_steps) if self.max_steps is not None else ("train.epochs", self.epochs)

    def total_steps(self, steps_per_epoch: float) -> int:
        return int(self.max_steps) if self.max_steps is not None else math.ceil(self.epochs * steps_per_epoch)

    def warmup(self, steps_per_epoch: float) -> int:
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return round((self.warmup_epochs or 0) * steps_per_epoch)

    def lr_at(self, step: int, total: int, warmup: int) -> float:
        return cosine_lr(step, total, warmup, self.lr, self.warmup_lr, self.min_lr)


def cosine_lr(step: int, total: int, warmup: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """LR of 0-based optimizer step `step`: linear warmup from warmup_lr, then cosine to min_lr
    over the remaining steps (timm CosineLRScheduler with warmup_prefix, stepped per iteration)."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


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
    task: TaskConfig
    config: Dict[str, Any]            # the resolved tree (class count included): config.yaml

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


# ----------------------------------------------------------------------------- resolve
def resolve_spec(cfg: DictConfig, world_size: Optional[int] = None, *, resolve_data: bool = True) -> RunSpec:
    """The run spec of a composed config for `world_size` ranks (default: the launcher's).
    Raises ConfigError naming the key. `resolve_data=False` checks the data keys without reading
    any file (_info.json, shard lists): for config checks before a run."""
    world = launch_world_size() if world_size is None else world_size
    train = _train_options(cfg.train)
    _check_batch(train, world)
    _check_loop(train)
    optim, sched = OmegaConf.to_object(cfg.optim), cfg.sched
    _check_optim(optim, sched)
    data = _data(cfg.data, resolve_data)
    model = _model(cfg.model, data.num_classes or 1, train)  # null classes: known once resolved
    _check_run(cfg)
    if cfg.task.name not in TASKS:
        _fail("task.name", f"{cfg.task.name!r} is not one of {TASKS}")
    _check_task(cfg.task, model)
    if train.eval_class_map is not None and not os.path.exists(train.eval_class_map):
        _fail("train.eval_class_map", f"file not found: {train.eval_class_map}")
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["data"]["num_classes"] = data.num_classes
    return RunSpec(
        run=OmegaConf.to_object(cfg.run), run_dir=os.path.abspath(cfg.run.dir), train=train,
        variant=cfg.model.variant, model=model, pretrained=cfg.model.pretrained,
        pretrained_class_map=cfg.model.pretrained_class_map, data=data,
        batch=BatchGeometry(train.batch_size, train.grad_accum, world,
                            train.eval_batch_size or train.batch_size // (world * train.grad_accum)),
        schedule=_schedule(train, optim, sched), optim=optim, deepspeed=OmegaConf.to_object(cfg.deepspeed),
        logger=OmegaConf.to_object(cfg.logger), task=OmegaConf.to_object(cfg.task), config=saved)


def _train_options(node: DictConfig) -> TrainLoopConfig:
    t = OmegaConf.to_object(node)
    if t.amp_every is not None:  # the old name of probe_every
        log.warning("train.amp_every is deprecated: it is train.probe_every now (amplitude probes)")
        t = dataclasses.replace(t, probe_every=t.amp_every, amp_every=None)
    return t


def _check_batch(t: TrainLoopConfig, world: int) -> None:
    if t.batch_size < 1:
        _fail("train.batch_size", f"must be >= 1, got {t.batch_size}")
    if t.grad_accum < 1:
        _fail("train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    if t.batch_size % (world * t.grad_accum):
        _fail("train.batch_size", f"global batch {t.batch_size} is not divisible by world_size x "
              f"grad_accum = {world} x {t.grad_accum}")
    if t.eval_batch_size is not None and t.eval_batch_size < 1:
        _fail("train.eval_batch_size", "must be >= 1 or null")


def _check_loop(t: TrainLoopConfig) -> None:
    if t.max_steps is None and t.epochs is None:
        _fail("train.max_steps", "set train.max_steps or train.epochs")
    if t.max_steps is not None and t.max_steps < 1:
        _fail("train.max_steps", f"must be >= 1, got {t.max_steps}")
    if t.epochs is not None and t.epochs <= 0:
        _fail("train.epochs", f"must be > 0, got {t.epochs}")
    for k in ("eval_every", "log_every", "probe_every", "ckpt_every"):
        if getattr(t, k) < 0:
            _fail(f"train.{k}", f"must be >= 0, got {getattr(t, k)}")
    if t.log_every < 1:
        _fail("train.log_every", "must be >= 1")
    if t.keep_ckpts < 1:
        _fail("train.keep_ckpts", f"must be >= 1, got {t.keep_ckpts}")
    for key, value, valid in (("nan_policy", t.nan_policy, NAN_POLICIES), ("precision", t.precision, PRECISIONS),
                              ("progress", t.progress, ("auto", "bar", "lines"))):
        if value not in valid:
            _fail(f"train.{key}", f"{value!r} is not one of {'|'.join(valid)}")
    if t.max_consecutive_nonfinite < 1:
        _fail("train.max_consecutive_nonfinite", "must be >= 1")
    if t.activation_checkpointing.every < 0:
        _fail("train.activation_checkpointing.every", "must be >= 0 (0 = off)")
    if t.ema_decay and not 0 < t.ema_decay < 1:
        _fail("train.ema_decay", f"must be in (0, 1), e.g. 0.9998 (null or 0: no EMA), got {t.ema_decay}")


def _model(node: DictConfig, num_classes: int, t: TrainLoopConfig) -> SwinV2Config:
    if node.variant not in swinv2.VARIANTS:
        _fail("model.variant", f"unknown variant {node.variant!r}; valid: {', '.join(swinv2.VARIANTS)}")
    model = model_config(node, num_classes)
    if t.activation_checkpointing.policy not in swinv2.checkpointing.GRANULARITIES:
        _fail("train.activation_checkpointing.policy",
              f"{t.activation_checkpointing.policy!r} is not one of {swinv2.checkpointing.GRANULARITIES}")
    if t.cpu_malloc not in CPU_MALLOC_POLICIES:
        _fail("train.cpu_malloc", f"{t.cpu_malloc!r} is not one of {CPU_MALLOC_POLICIES}")
    for st in t.activation_checkpointing.stages or []:
        if not 0 <= st < model.num_stages:
            _fail("train.activation_checkpointing.stages", f"stage {st} outside 0..{model.num_stages - 1}")
    if node.pretrained is None and any(model.pretrained_window_sizes):
        _fail("model.pretrained", "required: pretrained_window_sizes is set, i.e. this is a fine-tuning "
              "recipe; give the pre-trained weights (official format)")
    if node.pretrained is not None and not os.path.exists(node.pretrained):
        _fail("model.pretrained", f"file not found: {node.pretrained}")
    return model


def _check_optim(o: OptimConfig, s: DictConfig) -> None:
    if o.name != "adamw":
        _fail("optim.name", f"only 'adamw' is supported, got {o.name!r}")
    if o.lr <= 0:
        _fail("optim.lr", f"must be > 0, got {o.lr}")
    if o.lr_batch_ref is not None and o.lr_batch_ref < 1:
        _fail("optim.lr_batch_ref", "must be >= 1 or null")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", "must be >= 0")
    if not 0 < o.layer_decay <= 1:
        _fail("optim.layer_decay", f"must be in (0, 1] (1 = off), got {o.layer_decay}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        _fail("optim.betas", f"must be two values in [0, 1), got {list(o.betas)}")
    if o.clip_grad is not None and o.clip_grad < 0:
        _fail("optim.clip_grad", "must be >= 0 or null")
    if o.fused not in ("auto", "apex", "torch"):
        _fail("optim.fused", f"{o.fused!r} is not one of auto|apex|torch")
    if s.name != "cosine":
        _fail("sched.name", f"only 'cosine' is supported, got {s.name!r}")
    if s.warmup_steps is not None and s.warmup_steps < 0:
        _fail("sched.warmup_steps", "must be >= 0")
    if s.warmup_epochs is not None and s.warmup_epochs < 0:
        _fail("sched.warmup_epochs", "must be >= 0")
    if s.min_lr < 0 or s.warmup_lr < 0:
        _fail("sched.min_lr", "min_lr and warmup_lr must be >= 0")
    if s.min_lr > o.lr:
        _fail("sched.min_lr", f"{s.min_lr} is above optim.lr {o.lr}")


def _schedule(t: TrainLoopConfig, o: OptimConfig, s: DictConfig) -> Schedule:
    """Official linear scaling: every LR x global batch / optim.lr_batch_ref (null ref: as is)."""
    scale = t.batch_size / o.lr_batch_ref if o.lr_batch_ref else 1.0
    return Schedule(max_steps=t.max_steps, epochs=t.epochs, warmup_steps=s.warmup_steps,
                    warmup_epochs=s.warmup_epochs, lr=float(o.lr) * scale,
                    warmup_lr=float(s.warmup_lr) * scale, min_lr=float(s.min_lr) * scale)


def _data(node: DictConfig, resolve: bool) -> DataConfig:
    """The data package checks its own fields and the choice of source (data.root, shard patterns
    or the synthetic set); with `resolve`, the sources are read once (_info.json, shard lists,
    class count) and the loaders of every epoch read nothing but the shards."""
    try:
        data = check_sources(as_data_config(node).validate())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return resolve_sources(data) if resolve else data


def _check_task(node: DictConfig, model: SwinV2Config) -> None:
    """The task's own settings against the model (e.g. SimMIM's mask geometry); its messages name the key."""
    from .tasks import TASKS as TASK_CLASSES  # the tasks import the data package and the model

    check = getattr(TASK_CLASSES[node.name], "check_config", None)
    if check is not None:
        try:
            check(node, model)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_run(cfg: DictConfig) -> None:
    # ZeRO's overflow check is what discards non-finite gradients (nan_policy=skip); stage 0 fp32
    # would apply them
    if cfg.deepspeed.zero_stage not in (1, 2):
        _fail("deepspeed.zero_stage", f"must be 1 or 2 (this trainer uses ZeRO-1), got {cfg.deepspeed.zero_stage}")
    if cfg.logger.wandb.mode not in ("offline", "online", "disabled"):
        _fail("logger.wandb.mode", f"{cfg.logger.wandb.mode!r} is not one of offline|online|disabled")
    if not cfg.run.dir:
        _fail("run.dir", "must not be empty")
    if cfg.run.resume not in ("auto", "never") and not os.path.exists(cfg.run.resume):
        _fail("run.resume", f"not 'auto', 'never' or an existing path: {cfg.run.resume}")

"""One typed config per component of `swinv2-train`: run, train loop (with checkpoint cadence),
model, data (swinv2_train.data.config), optim + sched, deepspeed, logger and task (each task's own
dataclass, swinv2_train.tasks). Each class holds its defaults and its checks (`validate`, errors
name the key); the models and schedules they describe are built from them (`ModelConfig.build`,
`SchedConfig.build`). `TrainSchema` only aggregates them: it is registered in Hydra's ConfigStore
as `train_schema` and sits first in the defaults list of `configs/train.yaml`, so an unknown key
or a wrong type fails while Hydra composes. Group YAMLs state only what differs from these
defaults (tests/test_config.py holds them to it); recipes (experiment/) may state values in full.
Values that depend on other components (batch vs world x accum, window vs resolution, ...) are
checked when the run spec is built (`swinv2_train.spec.resolve_spec`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Dict, List, Optional, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

import swinv2
from swinv2.config import SwinV2Config
from .allocator import CPU_MALLOC_POLICIES
from .data.config import DataConfig
from .errors import UserError
from .evaluation import DTYPES
from .tasks import TASKS

PRECISIONS = tuple(DTYPES)  # fp32 | bf16 | fp16
NAN_POLICIES = ("skip", "fail")


PROGRESS_STYLES = ("auto", "bar", "lines")
FUSED_OPTIMIZERS = ("auto", "apex", "torch")
WANDB_MODES = ("offline", "online", "disabled")


class ConfigError(UserError, ValueError):
    """A config value is impossible; the message starts with the dotted key."""


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"{key}: {msg}")


def _one_of(key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        _fail(key, f"{value!r} is not one of {'|'.join(valid)}")


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = "runs/${run.name}"      # deterministic (never a clock): every rank and requeue agree
    resume: str = "auto"               # auto | never | <checkpoint dir or tag dir>
    seed: int = 0
    export_official: bool = True       # write model_official.pth at the end of the run
    # run.plan=true: print the preflight plan and exit (swinv2_train.plan; nothing built, no process group)
    plan: bool = False
    plan_ranks: Optional[int] = None   # ranks the plan is for (null: the launcher's world size)
    plan_gpu: str = "H100"             # peak and memory when no GPU is detected: a name of swinv2_train.gpus
    plan_gpus_per_node: int = 8
    plan_mfu: float = 0.4              # the model FLOPs utilisation the throughput figures assume
    plan_loader_rate: float = 150.0    # images/s one data-loader core delivers (docs/PERFORMANCE.md, data loader)

    def validate_plan(self) -> "RunConfig":
        if self.plan_ranks is not None and self.plan_ranks < 1:
            _fail("run.plan_ranks", f"must be >= 1 or null, got {self.plan_ranks}")
        if not 0 < self.plan_mfu <= 1:
            _fail("run.plan_mfu", f"must be in (0, 1], got {self.plan_mfu}")
        if self.plan_loader_rate <= 0 or self.plan_gpus_per_node < 1:
            _fail("run.plan_loader_rate" if self.plan_loader_rate <= 0 else "run.plan_gpus_per_node", "must be > 0")
        return self

    def validate(self) -> "RunConfig":
        if not self.dir:
            _fail("run.dir", "must not be empty")
        if self.resume not in ("auto", "never") and not os.path.exists(self.resume):
            _fail("run.resume", f"not 'auto', 'never' or an existing path: {self.resume}")
        return self


@dataclass
class ActivationCheckpointing:
    every: int = 0                     # 0 off, 1 every block, k every k-th block (global index)
    stages: Optional[List[int]] = None  # restrict to these stages (null: all)
    # block: recompute the whole block | half: attention and MLP halves as two regions |
    # selective: keep the matrix products' outputs, recompute the pointwise work (swinv2/checkpointing.py)
    policy: str = "block"


@dataclass
class TrainLoopConfig:
    batch_size: int = 128              # GLOBAL batch per optimizer step (all ranks, all micro-steps)
    grad_accum: int = 1
    max_steps: Optional[int] = None    # wins over epochs when set
    epochs: Optional[float] = None
    eval_every: int = 0                # 0: only at the end
    log_every: int = 10
    probe_every: int = 50              # activation-amplitude probes (metrics amplitude/...); 0 off
    amp_every: Optional[int] = None    # DEPRECATED name of probe_every (read when set, with a warning)
    ckpt_every: int = 0                # 0: only at the end (and on preemption)
    keep_ckpts: int = 2
    nan_policy: str = "skip"           # skip | fail
    max_consecutive_nonfinite: int = 5
    precision: str = "fp32"            # fp32 | bf16 | fp16
    activation_checkpointing: ActivationCheckpointing = field(default_factory=ActivationCheckpointing)
    compile: bool = False
    eval_batch_size: Optional[int] = None  # per rank; null: the train micro batch
    eval_class_map: Optional[str] = None   # 22K-head model evaluated on 1K labels: logits[:, map]
    progress: str = "auto"             # auto (tqdm on a terminal) | bar | lines
    dist_timeout_s: float = 600.0
    cpu_threads: Optional[int] = None  # CPU training: intra-op threads; null = auto (see loop.cpu_threads)
    cpu_malloc: str = "auto"           # CPU, glibc (nothing if jemalloc/tcmalloc is preloaded): on (mmap threshold 1 MiB: RSS at live memory) | retain (freed blocks stay in the heap: no page faults) | auto (on from 1024^2, retain below) | off
    stop_at_step: Optional[int] = None  # checkpoint and exit after this step (time-limited jobs)
    ema_decay: Optional[float] = None  # EMA of weights (e.g. 0.9998), val_ema/* + model_ema_official.pth; null/0 off
    ema_warmup: bool = True            # decay of update n: min(ema_decay, (1 + n) / (10 + n)) (swinv2_train.ema)
    peak_tflops: Optional[float] = None  # per device, for MFU; null: the GPU's from swinv2_train.throughput's table
    profile_steps: List[int] = field(default_factory=list)  # [a, b]: trace steps a..b to RUN_DIR/profile/
    oom_snapshot: bool = False         # CUDA: record allocations; a step out of memory dumps a snapshot
    gpu_memory_gb: Optional[float] = None  # the GPU's memory for run.plan's fit check (null: detected)
    # DEBUG ONLY: make the loss NaN on rank 0 at these optimizer steps (tests of nan_policy).
    debug_inject_nan_steps: List[int] = field(default_factory=list)

    def validate(self, world: int) -> "TrainLoopConfig":
        """The loop's own keys, and the global batch against `world` ranks x grad_accum."""
        self._validate_batch(world)
        self._validate_budget_and_cadences()
        for key, valid in (("nan_policy", NAN_POLICIES), ("precision", PRECISIONS), ("progress", PROGRESS_STYLES),
                           ("cpu_malloc", CPU_MALLOC_POLICIES)):
            _one_of(f"train.{key}", getattr(self, key), valid)
        _one_of("train.activation_checkpointing.policy", self.activation_checkpointing.policy,
                swinv2.checkpointing.GRANULARITIES)
        if self.activation_checkpointing.every < 0:
            _fail("train.activation_checkpointing.every", "must be >= 0 (0 = off)")
        if self.max_consecutive_nonfinite < 1:
            _fail("train.max_consecutive_nonfinite", "must be >= 1")
        if self.ema_decay and not 0 < self.ema_decay < 1:
            _fail("train.ema_decay", f"must be in (0, 1), e.g. 0.9998 (null or 0: no EMA), got {self.ema_decay}")
        if self.eval_class_map is not None and not os.path.exists(self.eval_class_map):
            _fail("train.eval_class_map", f"file not found: {self.eval_class_map}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            _fail("train.peak_tflops", f"must be > 0 (TFLOP/s per device) or null, got {self.peak_tflops}")
        steps = list(self.profile_steps)
        if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
            _fail("train.profile_steps", f"must be [first, last] optimizer steps with 1 <= first <= last "
                  f"(e.g. [5,6]) or [], got {steps}")
        return self

    def _validate_batch(self, world: int) -> None:
        if self.batch_size < 1:
            _fail("train.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.grad_accum < 1:
            _fail("train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        if self.batch_size % (world * self.grad_accum):
            _fail("train.batch_size", f"global batch {self.batch_size} is not divisible by world_size x "
                  f"grad_accum = {world} x {self.grad_accum}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            _fail("train.eval_batch_size", "must be >= 1 or null")

    def _validate_budget_and_cadences(self) -> None:
        if self.max_steps is None and self.epochs is None:
            _fail("train.max_steps", "set train.max_steps or train.epochs")
        if self.max_steps is not None and self.max_steps < 1:
            _fail("train.max_steps", f"must be >= 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            _fail("train.epochs", f"must be > 0, got {self.epochs}")
        for k in ("eval_every", "log_every", "probe_every", "ckpt_every"):
            if getattr(self, k) < 0:
                _fail(f"train.{k}", f"must be >= 0, got {getattr(self, k)}")
        if self.log_every < 1:
            _fail("train.log_every", "must be >= 1")
        if self.keep_ckpts < 1:
            _fail("train.keep_ckpts", f"must be >= 1, got {self.keep_ckpts}")


# The `model` node maps onto swinv2.SwinV2Config field by field: it is generated from that
# dataclass, so a new model field is a new config key with no edit here. Every field is an
# optional override (null: the variant's value from swinv2's variant table, else SwinV2Config's
# default), so `model.variant=base` alone gives SwinV2-B; the class count is data.num_classes (it
# may come from the data source), not a model key.
MODEL_FROM_DATA = ("num_classes",)
MODEL_FIELDS = tuple(f.name for f in fields(SwinV2Config) if f.name not in MODEL_FROM_DATA)


def _optional(tp: Any) -> Any:
    """SwinV2Config's annotation as an optional OmegaConf type (tuples are lists in YAML)."""
    if get_origin(tp) is tuple:
        tp = List[get_args(tp)[0]]
    return Optional[tp]


def model_kwargs(mcfg: Any, num_classes: int) -> Dict[str, Any]:
    """`variant` and every SwinV2Config field set (non-null) in the `model` node, plus the class
    count: the arguments of swinv2.create_model / SwinV2Config.from_variant."""
    get = (lambda k: mcfg.get(k)) if isinstance(mcfg, (dict, DictConfig)) else (lambda k: getattr(mcfg, k, None))
    kw: Dict[str, Any] = {"variant": get("variant")}
    for k in MODEL_FIELDS:
        v = get(k)
        if v is not None:
            kw[k] = tuple(v) if isinstance(v, (list, tuple)) or OmegaConf.is_list(v) else v
    kw["num_classes"] = num_classes
    return kw


def model_config(mcfg: Any, num_classes: int) -> SwinV2Config:
    """The model's SwinV2Config from the `model` node; errors name the key (`model.<field>`)."""
    if mcfg.variant not in swinv2.VARIANTS:
        _fail("model.variant", f"unknown variant {mcfg.variant!r}; valid: {', '.join(swinv2.VARIANTS)}")
    kw = model_kwargs(mcfg, num_classes)
    try:
        return SwinV2Config.from_variant(kw.pop("variant"), **kw)
    except ValueError as e:  # "field: message" -> "model.field: message"
        raise ConfigError(f"model.{e}") from None


def _validate_model(self) -> Any:
    """The weights to start from (the architecture is checked by `build`, with the class count)."""
    if self.pretrained is not None and not os.path.exists(self.pretrained):
        _fail("model.pretrained", f"file not found: {self.pretrained}")
    return self


def _build_model(self, num_classes: int) -> SwinV2Config:
    """The SwinV2Config of this node for `num_classes`; a fine-tuning geometry needs its weights."""
    built = model_config(self, num_classes)
    if self.pretrained is None and any(built.pretrained_window_sizes):
        _fail("model.pretrained", "required: pretrained_window_sizes is set, i.e. this is a fine-tuning "
              "recipe; give the pre-trained weights (official format)")
    return built


ModelConfig = make_dataclass(
    "ModelConfig",
    [("variant", str, field(default="tiny")),
     *[(f.name, _optional(tp), field(default=None))
       for f, tp in ((f, get_type_hints(SwinV2Config)[f.name]) for f in fields(SwinV2Config))
       if f.name not in MODEL_FROM_DATA],
     ("pretrained", Optional[str], field(default=None)),            # official-format weights to fine-tune
     ("pretrained_class_map", Optional[str], field(default=None))],  # 22K->1K head rows (map22kto1k.txt)
    namespace={"validate": _validate_model, "build": _build_model})
ModelConfig.__module__ = __name__


@dataclass
class OptimConfig:
    name: str = "adamw"                # AdamW with the official weight-decay exclusions (swinv2.param_groups)
    lr: float = 5e-4                   # base LR per `lr_batch_ref` images
    lr_batch_ref: Optional[int] = 512  # effective lr = lr * batch_size / lr_batch_ref; null: as is
    weight_decay: float = 0.05
    # layer-wise LR decay (official get_swin_layer grouping): lr x layer_decay^(L+1-id); 1.0 = off.
    # The paper's SwinV2-G supervised stage 2 used 0.87.
    layer_decay: float = 1.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: Optional[float] = 5.0   # null or 0: no clipping
    fused: str = "auto"                # auto (apex if importable and on GPU) | apex | torch

    def validate(self) -> "OptimConfig":
        if self.name != "adamw":
            _fail("optim.name", f"only 'adamw' is supported, got {self.name!r}")
        if self.lr <= 0:
            _fail("optim.lr", f"must be > 0, got {self.lr}")
        if self.lr_batch_ref is not None and self.lr_batch_ref < 1:
            _fail("optim.lr_batch_ref", "must be >= 1 or null")
        if self.weight_decay < 0:
            _fail("optim.weight_decay", "must be >= 0")
        if not 0 < self.layer_decay <= 1:
            _fail("optim.layer_decay", f"must be in (0, 1] (1 = off), got {self.layer_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail("optim.betas", f"must be two values in [0, 1), got {list(self.betas)}")
        if self.clip_grad is not None and self.clip_grad < 0:
            _fail("optim.clip_grad", "must be >= 0 or null")
        _one_of("optim.fused", self.fused, FUSED_OPTIMIZERS)
        return self

    def lr_scale(self, global_batch: int) -> float:
        """Official linear scaling: every LR x global batch / lr_batch_ref (null ref: as is)."""
        return global_batch / self.lr_batch_ref if self.lr_batch_ref else 1.0


@dataclass
class SchedConfig:
    """Linear warmup from warmup_lr, then cosine to min_lr; stepped every optimizer step.
    warmup_lr and min_lr are scaled with the batch like optim.lr (official main.py)."""

    name: str = "cosine"
    warmup_epochs: Optional[float] = 20
    warmup_steps: Optional[int] = None  # wins over warmup_epochs
    warmup_lr: float = 5e-7            # base values, scaled like optim.lr (official)
    min_lr: float = 5e-6

    def validate(self, optim: OptimConfig) -> "SchedConfig":
        if self.name != "cosine":
            _fail("sched.name", f"only 'cosine' is supported, got {self.name!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            _fail("sched.warmup_steps", "must be >= 0")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            _fail("sched.warmup_epochs", "must be >= 0")
        if self.min_lr < 0 or self.warmup_lr < 0:
            _fail("sched.min_lr", "min_lr and warmup_lr must be >= 0")
        if self.min_lr > optim.lr:
            _fail("sched.min_lr", f"{self.min_lr} is above optim.lr {optim.lr}")
        return self

    def build(self, optim: OptimConfig, train: "TrainLoopConfig") -> "Schedule":
        scale = optim.lr_scale(train.batch_size)
        return Schedule(max_steps=train.max_steps, epochs=train.epochs, warmup_steps=self.warmup_steps,
                        warmup_epochs=self.warmup_epochs, lr=float(optim.lr) * scale,
                        warmup_lr=float(self.warmup_lr) * scale, min_lr=float(self.min_lr) * scale)


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


@dataclass
class DeepSpeedSection:
    zero_stage: int = 1
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    loss_scale: float = 0.0            # fp16 only; 0 = dynamic
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    extra: Dict[str, Any] = field(default_factory=dict)  # merged verbatim into the DS config

    def validate(self) -> "DeepSpeedSection":
        # ZeRO's overflow check is what discards non-finite gradients (nan_policy=skip); stage 0
        # fp32 would apply them
        if self.zero_stage not in (1, 2):
            _fail("deepspeed.zero_stage", f"must be 1 or 2 (this trainer uses ZeRO-1), got {self.zero_stage}")
        return self


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"              # offline | online | disabled (offline: files only, sync later)
    project: str = "swinv2"
    entity: Optional[str] = None
    name: Optional[str] = None         # null: run.name
    group: Optional[str] = None        # null: the experiment (experiment=NAME; else run.name)
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)  # files in ${run.dir}/wandb
    tensorboard: bool = True
    jsonl: bool = True

    def validate(self) -> "LoggerConfig":
        _one_of("logger.wandb.mode", self.wandb.mode, WANDB_MODES)
        return self


@dataclass
class TrainSchema:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    task: Any = MISSING  # the selected task's own dataclass: `task=<name>` (register below)


def register() -> None:
    """The schema, and every task's config under the `task` group by its name (`task=simmim`)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainSchema)
    for name, task in TASKS.items():
        store.store(group="task", name=name, node=task.Config)


register()


def validate(cfg: DictConfig, world_size: Optional[int] = None) -> DictConfig:
    """Check `cfg` without touching data or devices: building the run spec is the validation
    (see swinv2_train.spec.resolve_spec). Returns `cfg`."""
    from .spec import resolve_spec  # spec.py imports this module (the schema)

    resolve_spec(cfg, world_size, resolve_data=False)
    return cfg

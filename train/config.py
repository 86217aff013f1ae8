"""Typed config schema for `swinv2-train` (what Hydra composes; swinv2_train.spec resolves it).

The dataclasses are registered in Hydra's ConfigStore as `train_schema` and sit first in the
defaults list of `configs/train.yaml`, so an unknown key or a wrong type fails while Hydra
composes. Values that depend on each other (batch vs world x accum, variant, window vs
resolution, ...) are checked when the run spec is built (`swinv2_train.spec.resolve_spec`);
every error names its key. The `model` node is generated from swinv2.SwinV2Config.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Dict, List, Optional, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from swinv2.config import SwinV2Config
from .data.config import DataConfig
from .errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
NAN_POLICIES = ("skip", "fail")


class ConfigError(UserError, ValueError):
    """A config value is impossible; the message starts with the dotted key."""


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = "runs/${run.name}"      # deterministic (never a clock): every rank and requeue agree
    resume: str = "auto"               # auto | never | <checkpoint dir or tag dir>
    seed: int = 0
    export_official: bool = True       # write model_official.pth at the end of the run


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
    # DEBUG ONLY: make the loss NaN on rank 0 at these optimizer steps (tests of nan_policy).
    debug_inject_nan_steps: List[int] = field(default_factory=list)


# The `model` node maps onto swinv2.SwinV2Config field by field: it is generated from that
# dataclass, so a new model field is a new config key with no edit here. Every field is an
# optional override (null: the variant's value, else SwinV2Config's default); the class count is
# data.num_classes (it may come from the data source), not a model key.
MODEL_FROM_DATA = ("num_classes",)


def _optional(tp: Any) -> Any:
    """SwinV2Config's annotation as an optional OmegaConf type (tuples are lists in YAML)."""
    if get_origin(tp) is tuple:
        tp = List[get_args(tp)[0]]
    return Optional[tp]


ModelConfig = make_dataclass(
    "ModelConfig",
    [("variant", str, field(default="tiny")),
     *[(f.name, _optional(tp), field(default=None))
       for f, tp in ((f, get_type_hints(SwinV2Config)[f.name]) for f in fields(SwinV2Config))
       if f.name not in MODEL_FROM_DATA],
     ("pretrained", Optional[str], field(default=None)),            # official-format weights to fine-tune
     ("pretrained_class_map", Optional[str], field(default=None))])  # 22K->1K head rows (map22kto1k.txt)
ModelConfig.__module__ = __name__
MODEL_FIELDS = tuple(f.name for f in fields(SwinV2Config) if f.name not in MODEL_FROM_DATA)


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
    kw = model_kwargs(mcfg, num_classes)
    try:
        return SwinV2Config.from_variant(kw.pop("variant"), **kw)
    except ValueError as e:  # "field: message" -> "model.field: message"
        raise ConfigError(f"model.{e}") from None


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 5e-4                   # base LR per `lr_batch_ref` images
    lr_batch_ref: Optional[int] = 512  # effective lr = lr * batch_size / lr_batch_ref; null: as is
    weight_decay: float = 0.05
    layer_decay: float = 1.0           # layer-wise LR decay (official get_swin_layer ids); 1.0 = off
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: Optional[float] = 5.0   # null or 0: no clipping
    fused: str = "auto"                # auto (apex if importable and on GPU) | apex | torch


@dataclass
class SchedConfig:
    name: str = "cosine"
    warmup_epochs: Optional[float] = None
    warmup_steps: Optional[int] = None  # wins over warmup_epochs
    warmup_lr: float = 5e-7            # base values, scaled like optim.lr (official)
    min_lr: float = 5e-6


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


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"              # offline | online | disabled
    project: str = "swinv2"
    entity: Optional[str] = None
    name: Optional[str] = None         # null: run.name
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = True
    jsonl: bool = True


TASKS = ("classification", "simmim")  # configs/task/<name>.yaml; train/tasks/<name>.py


@dataclass
class NormTargetConfig:               # task=simmim: local target normalisation (official NORM_TARGET)
    enable: bool = True
    window: int = 47                   # odd, centred on the pixel


@dataclass
class TaskConfig:
    name: str = "classification"       # what a batch is trained for: its loss, metrics and eval
    # task=simmim only (train/tasks/simmim.py; the classification task ignores them)
    mask_patch_size: int = 32          # masks drawn per cell of this many pixels (divides model.img_size)
    mask_ratio: float = 0.6            # ceil(ratio x cells) cells masked per image
    norm_target: NormTargetConfig = field(default_factory=NormTargetConfig)
    recon_every: int = 0               # reconstruction grid (PNG + TensorBoard) every N steps; 0 off


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
    task: TaskConfig = field(default_factory=TaskConfig)


def register() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)


register()


def validate(cfg: DictConfig, world_size: Optional[int] = None) -> DictConfig:
    """Check `cfg` without touching data or devices: building the run spec is the validation
    (see swinv2_train.spec.resolve_spec). Returns `cfg`."""
    from .spec import resolve_spec  # spec.py imports this module (the schema)

    resolve_spec(cfg, world_size, resolve_data=False)
    return cfg

"""Typed config schema for `swinv2-train` and the checks Hydra cannot express.

The dataclasses are registered in Hydra's ConfigStore as `train_schema` and sit first in the
defaults list of `configs/train.yaml`, so an unknown key or a wrong type fails while Hydra
composes. `validate()` then checks values that depend on each other (batch vs world x accum,
variant, window vs resolution, ...) before any process group or data exists; every error names
its key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from swinv2_train.data.config import DataConfig
from swinv2_train.errors import UserError

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


@dataclass
class TrainLoopConfig:
    batch_size: int = 128              # GLOBAL batch per optimizer step (all ranks, all micro-steps)
    grad_accum: int = 1
    max_steps: Optional[int] = None    # wins over epochs when set
    epochs: Optional[float] = None
    eval_every: int = 0                # 0: only at the end
    log_every: int = 10
    amp_every: int = 50                # activation-amplitude probes; 0 off
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
    stop_at_step: Optional[int] = None  # checkpoint and exit after this step (time-limited jobs)
    # DEBUG ONLY: make the loss NaN on rank 0 at these optimizer steps (tests of nan_policy).
    debug_inject_nan_steps: List[int] = field(default_factory=list)


@dataclass
class ModelConfig:
    variant: str = "tiny"
    img_size: int = 256
    window_size: int = 8
    pretrained_window_sizes: List[int] = field(default_factory=lambda: [0, 0, 0, 0])
    attention: str = "reference"       # reference | fused | sequential
    drop_path_rate: float = 0.1
    # optional overrides of the variant table (null: the variant's value)
    embed_dim: Optional[int] = None
    depths: Optional[List[int]] = None
    num_heads: Optional[List[int]] = None
    extra_norm_every: Optional[int] = None
    sequential_chunk: Optional[int] = None
    norm_style: Optional[str] = None   # res_post | pre (ablations / stability study)
    attn_type: Optional[str] = None    # cosine | dot
    pretrained: Optional[str] = None   # official-format weights to start from (fine-tuning)
    pretrained_class_map: Optional[str] = None  # 22K->1K head rows (map22kto1k.txt)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 5e-4                   # base LR per `lr_batch_ref` images
    lr_batch_ref: Optional[int] = 512  # effective lr = lr * batch_size / lr_batch_ref; null: as is
    weight_decay: float = 0.05
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


def register() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)


register()


# ----------------------------------------------------------------------------- checks
def expected_world_size() -> int:
    """World size from the launcher's environment, before any process group exists."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ:  # srun task (see distributed.py)
        return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS", "1"))
    return 1


def expected_rank() -> int:
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    return 0


def effective_lr(cfg: DictConfig, value: Optional[float] = None) -> float:
    """Official linear scaling: lr * global_batch / lr_batch_ref (no scaling when ref is null)."""
    value = cfg.optim.lr if value is None else value
    ref = cfg.optim.lr_batch_ref
    return float(value) if not ref else float(value) * cfg.train.batch_size / ref


def model_kwargs(mcfg: Any, num_classes: int) -> Dict[str, Any]:
    """Arguments of swinv2.create_model from the `model` node."""
    kw = dict(variant=mcfg.variant, img_size=mcfg.img_size, window_size=mcfg.window_size,
              num_classes=num_classes, pretrained_window_sizes=tuple(mcfg.pretrained_window_sizes),
              attention=mcfg.attention, drop_path_rate=mcfg.drop_path_rate)
    for k in ("embed_dim", "depths", "num_heads", "extra_norm_every", "sequential_chunk", "norm_style", "attn_type"):
        v = mcfg[k] if isinstance(mcfg, DictConfig) else getattr(mcfg, k)
        if v is not None:
            kw[k] = tuple(v) if isinstance(v, (list, tuple)) or OmegaConf.is_list(v) else v
    return kw


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"{key}: {msg}")


def validate(cfg: DictConfig, world_size: Optional[int] = None) -> DictConfig:
    """Reject impossible values, naming the key. Needs no process group, data or model weights."""
    import swinv2
    from swinv2.config import SwinV2Config

    world = expected_world_size() if world_size is None else world_size
    t, m, o, s = cfg.train, cfg.model, cfg.optim, cfg.sched

    # -- batch geometry
    if t.batch_size < 1:
        _fail("train.batch_size", f"must be >= 1, got {t.batch_size}")
    if t.grad_accum < 1:
        _fail("train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    if t.batch_size % (world * t.grad_accum):
        _fail("train.batch_size", f"global batch {t.batch_size} is not divisible by world_size x "
              f"grad_accum = {world} x {t.grad_accum}")
    if t.max_steps is None and t.epochs is None:
        _fail("train.max_steps", "set train.max_steps or train.epochs")
    if t.max_steps is not None and t.max_steps < 1:
        _fail("train.max_steps", f"must be >= 1, got {t.max_steps}")
    if t.epochs is not None and t.epochs <= 0:
        _fail("train.epochs", f"must be > 0, got {t.epochs}")
    for k in ("eval_every", "log_every", "amp_every", "ckpt_every"):
        if t[k] < 0:
            _fail(f"train.{k}", f"must be >= 0, got {t[k]}")
    if t.log_every < 1:
        _fail("train.log_every", "must be >= 1")
    if t.keep_ckpts < 1:
        _fail("train.keep_ckpts", f"must be >= 1, got {t.keep_ckpts}")
    if t.nan_policy not in NAN_POLICIES:
        _fail("train.nan_policy", f"{t.nan_policy!r} is not one of {NAN_POLICIES}")
    if t.max_consecutive_nonfinite < 1:
        _fail("train.max_consecutive_nonfinite", "must be >= 1")
    if t.precision not in PRECISIONS:
        _fail("train.precision", f"{t.precision!r} is not one of {PRECISIONS}")
    if t.progress not in ("auto", "bar", "lines"):
        _fail("train.progress", f"{t.progress!r} is not one of auto|bar|lines")
    if t.activation_checkpointing.every < 0:
        _fail("train.activation_checkpointing.every", "must be >= 0 (0 = off)")
    if t.eval_batch_size is not None and t.eval_batch_size < 1:
        _fail("train.eval_batch_size", "must be >= 1 or null")

    # -- model: variant, then the geometry checks of the model's own config
    if m.variant not in swinv2.VARIANTS:
        _fail("model.variant", f"unknown variant {m.variant!r}; valid: {', '.join(swinv2.VARIANTS)}")
    kw = model_kwargs(m, cfg.data.num_classes or 1)  # null: known once the data is resolved
    variant = kw.pop("variant")
    try:
        mc = SwinV2Config.from_variant(variant, **kw)
    except ValueError as e:  # "field: message" -> "model.field: message"
        raise ConfigError(f"model.{e}") from None
    n_stages = len(mc.depths)
    for st in t.activation_checkpointing.stages or []:
        if not 0 <= st < n_stages:
            _fail("train.activation_checkpointing.stages", f"stage {st} outside 0..{n_stages - 1}")
    if m.pretrained is None and any(m.pretrained_window_sizes):
        _fail("model.pretrained", "required: pretrained_window_sizes is set, i.e. this is a fine-tuning "
              "recipe; give the pre-trained weights (official format)")
    if m.pretrained is not None and not os.path.exists(m.pretrained):
        _fail("model.pretrained", f"file not found: {m.pretrained}")

    # -- optimizer and schedule
    if o.name != "adamw":
        _fail("optim.name", f"only 'adamw' is supported, got {o.name!r}")
    if o.lr <= 0:
        _fail("optim.lr", f"must be > 0, got {o.lr}")
    if o.lr_batch_ref is not None and o.lr_batch_ref < 1:
        _fail("optim.lr_batch_ref", "must be >= 1 or null")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", "must be >= 0")
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

    # -- deepspeed / logging / run
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

    # -- data: the data package checks its own fields and the choice of source (data.root,
    # shard patterns or the synthetic set); reading _info.json or counting shards waits for
    # resolve_sources, once, when the run starts
    try:
        from swinv2_train.data.sources import check_sources

        check_sources(DataConfig(**OmegaConf.to_container(cfg.data, resolve=True)).validate())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if t.eval_class_map is not None and not os.path.exists(t.eval_class_map):
        _fail("train.eval_class_map", f"file not found: {t.eval_class_map}")
    return cfg

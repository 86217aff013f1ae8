"""`DataConfig`: the `data.*` node of the Hydra config (structured-config friendly).

Augmentation fields default to ``None`` meaning "take the value from the ``augment`` preset";
`DataConfig.resolved()` returns a copy with every ``None`` aug field filled in, which is what the
pipeline uses. Only primitives / Optional / lists appear so Hydra's ConfigStore accepts it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Preset -> aug defaults. "imagenet" is the official Swin V2 recipe (timm create_transform args in
# the official build_loader + Mixup). colour jitter 0.4 is configured there but timm does NOT
# apply it when RandAugment is on; we follow timm (see `force_color_jitter`).
AUG_PRESETS = {
    "imagenet": dict(
        rrc_scale_min=0.08, hflip=0.5, rand_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4,
        reprob=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1, mixup_switch_prob=0.5,
    ),
    "light": dict(
        rrc_scale_min=0.67, hflip=0.5, rand_augment="", color_jitter=0.0,
        reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0, mixup_switch_prob=0.5,
    ),
    # "none": no random train aug at all: resize + centre crop + normalise (same as eval).
    "none": dict(
        rrc_scale_min=1.0, hflip=0.0, rand_augment="", color_jitter=0.0,
        reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0, mixup_switch_prob=0.5,
    ),
}
_AUG_FIELDS = tuple(AUG_PRESETS["imagenet"].keys())
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")


@dataclass
class DataConfig:
    # --- sources --------------------------------------------------------------------------
    # Where the data comes from is decided once, by `sources.resolve_sources` (see there).
    root: Optional[str] = None           # a directory of shards: _info.json, or *.tar named by split
    train_split: str = "train"           # split names: keys of _info.json "splits", or shard-name
    val_split: str = "validation"        # words (train-000000.tar); val and validation are one name
    train_shards: Optional[str] = None   # brace pattern / '::'-joined list; wins over root per split
    val_shards: Optional[str] = None     # root and both shards null -> the built-in synthetic set
    num_classes: Optional[int] = None    # null: from _info.json (or 10 for the synthetic set)
    train_samples: Optional[int] = None  # epoch length; None -> _info.json, else usable ones counted once
    val_samples: Optional[int] = None
    class_map: Optional[str] = None      # 22K->1K map file (json list/dict or text), eval only
    synthetic_dir: Optional[str] = None  # cache dir for the generated default dataset
    # --- streaming ------------------------------------------------------------------------
    # data workers per rank; "auto": the largest power of two leaving a core of this rank's share
    # of its CPU affinity to the main process (feed.auto_workers; resolved when the config is built)
    num_workers: Any = 2
    # Train order (stream.py): C streams, each owning shards i with i % C == its index, dealt to
    # (rank, worker); the order depends on C, never on ranks x workers. null: the first run's
    # ranks x workers, kept in the checkpoint and reused on resume (any ranks x workers dividing C).
    canonical_streams: Optional[int] = None
    shuffle_buffer: int = 1000           # encoded samples per canonical stream (train); 0 disables
    shard_shuffle: bool = True
    resampled: bool = False              # draw shards with replacement (huge datasets)
    pin_memory: bool = False
    prefetch_factor: int = 2
    timeout_s: float = 0.0               # DataLoader per-batch timeout (0 = wait forever), workers only
    # Remote shards (http(s)://, pipe:; remote.py): a failed try is retried from where it stopped,
    # at most io_retries times per shard; io_timeout_s is the longest wait without a byte. A
    # stalled shard thus costs at most io_timeout_s x (io_retries + 1), then it is skipped.
    io_retries: int = 3
    io_timeout_s: float = 30.0
    jpeg_draft: bool = True              # PIL draft-mode decode of large JPEGs
    # --- bad input ------------------------------------------------------------------------
    max_bad_fraction: float = 0.05       # raise if more bad samples than this in a window ...
    bad_window: int = 1000               # ... of this many samples (per worker, sliding)
    # Stop when more than this share of the shards a worker reads in an epoch fail (unreadable
    # or cut short, after the retries); the message names them. 1.0: never stop for this.
    max_failed_shards: float = 0.05
    # --- augmentation (None = from the preset) ---------------------------------------------
    augment: str = "imagenet"            # imagenet | light | none
    rrc_scale_min: Optional[float] = None
    rrc_ratio: List[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    hflip: Optional[float] = None
    rand_augment: Optional[str] = None   # "" disables; timm spec e.g. rand-m9-mstd0.5-inc1
    color_jitter: Optional[float] = None
    force_color_jitter: bool = False     # timm skips jitter when RandAugment is on; True applies both
    reprob: Optional[float] = None       # random erasing prob (pixel mode, 1 box)
    mixup: Optional[float] = None        # mixup alpha
    cutmix: Optional[float] = None       # cutmix alpha
    label_smoothing: Optional[float] = None
    mixup_switch_prob: Optional[float] = None
    interpolation: str = "bicubic"
    # the workers' crop-resize: "torch" (antialiased bicubic of the uint8 crop, ~1.4x faster a
    # sample) or "pil" (Pillow's, the pixels of runs begun before the uint8 feed, bit for bit)
    resize: str = "torch"
    test_crop: Optional[bool] = None     # None: crop (resize 256/224 + centre crop) iff img_size < 384
    crop_pct: float = 224.0 / 256.0
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def __post_init__(self):
        if self.num_workers == "auto":  # saved configs keep "auto": each start follows its own cores
            from .feed import auto_workers

            self.num_workers = auto_workers()

    # ------------------------------------------------------------------------------------
    def resolved(self) -> "DataConfig":
        """Copy with every None aug field taken from the `augment` preset (validated)."""
        self.validate()
        preset = AUG_PRESETS[self.augment]
        changes = {k: preset[k] for k in _AUG_FIELDS if getattr(self, k) is None}
        out = dataclasses.replace(self, **changes)
        out.validate()
        return out

    def validate(self) -> "DataConfig":
        def bad(key, why):
            raise ValueError(f"data.{key}={getattr(self, key)!r}: {why}")

        if self.augment not in AUG_PRESETS:
            bad("augment", f"must be one of {sorted(AUG_PRESETS)}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int)
                                             or self.num_classes < 1):
            bad("num_classes", "must be a positive integer or null (null: from _info.json)")
        for k in ("train_split", "val_split"):
            if not isinstance(getattr(self, k), str) or not getattr(self, k).strip():
                bad(k, "must be a split name, e.g. train or validation")
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 0:
            bad("num_workers", "must be an integer >= 0 or auto (this rank's cores minus one, a power of two)")
        if self.canonical_streams is not None and (not isinstance(self.canonical_streams, int)
                                                   or self.canonical_streams < 1):
            bad("canonical_streams", "must be a positive integer or null (null: ranks x workers "
                "of the first run)")
        if self.shuffle_buffer < 0:
            bad("shuffle_buffer", "must be >= 0")
        if self.timeout_s < 0:
            bad("timeout_s", "must be >= 0")
        if not isinstance(self.io_retries, int) or self.io_retries < 0:
            bad("io_retries", "must be an integer >= 0 (tries after the first, per shard)")
        if not self.io_timeout_s > 0:
            bad("io_timeout_s", "must be > 0 (seconds without a byte before a try fails)")
        if not 0.0 <= self.max_failed_shards <= 1.0:
            bad("max_failed_shards", "must be in [0, 1] (1: never stop for failed shards)")
        if self.prefetch_factor < 1:
            bad("prefetch_factor", "must be >= 1")
        for k in ("train_samples", "val_samples"):
            v = getattr(self, k)
            if v is not None and v < 1:
                bad(k, "must be >= 1 or null")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            bad("max_bad_fraction", "must be in [0, 1]")
        if self.bad_window < 1:
            bad("bad_window", "must be >= 1")
        for k in ("hflip", "reprob", "label_smoothing", "mixup_switch_prob"):
            v = getattr(self, k)
            if v is not None and not 0.0 <= v <= 1.0:
                bad(k, "must be in [0, 1]")
        if self.label_smoothing is not None and self.label_smoothing >= 1.0:
            bad("label_smoothing", "must be < 1")
        for k in ("mixup", "cutmix", "color_jitter"):
            v = getattr(self, k)
            if v is not None and v < 0:
                bad(k, "must be >= 0")
        if self.rrc_scale_min is not None and not 0.0 < self.rrc_scale_min <= 1.0:
            bad("rrc_scale_min", "must be in (0, 1]")
        if len(self.rrc_ratio) != 2 or not 0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            bad("rrc_ratio", "must be [lo, hi] with 0 < lo <= hi")
        if self.rand_augment:
            from .transforms import parse_rand_augment  # local: transforms imports PIL

            try:
                parse_rand_augment(self.rand_augment)
            except ValueError as e:
                bad("rand_augment", str(e))
        if self.interpolation not in INTERPOLATIONS:
            bad("interpolation", f"must be one of {INTERPOLATIONS}")
        if self.resize not in ("torch", "pil"):
            bad("resize", "must be torch (fast) or pil (Pillow's pixels, as before the uint8 feed)")
        if not 0.0 < self.crop_pct <= 1.0:
            bad("crop_pct", "must be in (0, 1]")
        for k in ("mean", "std"):
            v = list(getattr(self, k))
            if len(v) != 3:
                bad(k, "must have 3 entries")
        if any(s <= 0 for s in self.std):
            bad("std", "entries must be > 0")
        return self


# Keys added while runs were in progress, with the value those runs had: a run whose saved config
# lacks the key keeps that value when it resumes or is evaluated, and so goes on bit-exactly.
BEFORE_THEIR_KEY = {"resize": "pil"}  # Pillow's resize before the uint8 feed (torch's since)


def kept_from_before(saved_data: Optional[dict]) -> dict:
    """The settings a run saved with `saved_data` (its config's data node) keeps from before their
    key existed."""
    if saved_data is None:
        return {}
    return {k: v for k, v in BEFORE_THEIR_KEY.items() if k not in saved_data}


def as_data_config(cfg: Any) -> DataConfig:
    """Accept a DataConfig, a dict or an OmegaConf node (the trainer passes `cfg.data`)."""
    if isinstance(cfg, DataConfig):
        return cfg
    if hasattr(cfg, "_metadata"):  # OmegaConf DictConfig, without importing omegaconf eagerly
        from omegaconf import OmegaConf

        obj = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg
        if isinstance(obj, DataConfig):
            return obj
        cfg = obj
    if not isinstance(cfg, dict):
        raise TypeError(f"expected DataConfig or mapping, got {type(cfg).__name__}")
    names = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(f"unknown data config keys: {unknown}")
    d = dict(cfg)
    for k in ("mean", "std", "rrc_ratio"):
        if k in d and d[k] is not None:
            d[k] = [float(x) for x in d[k]]
    return DataConfig(**d)

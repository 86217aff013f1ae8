"""SimMIM masked image modelling (official ``main_simmim_pt.py`` / ``models/simmim.py``): a batch is
(images, masks) with masks drawn in the data workers (swinv2_train.data.masking); the loss is the
masked L1 of swinv2.simmim.SimMIM; evaluation is the same masked L1 on the validation images with
fixed masks; the export is the official SimMIM state dict (``encoder.*``, ``decoder.0.*``).

Config: `SimMIMConfig` below (`task=simmim`), the official SwinV2-B SimMIM values by default.
"""
from __future__ import annotations

import logging
import os
import random
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf

from swinv2.simmim import (DEFAULT_NORM_TARGET_WINDOW, SimMIM, load_simmim_state_dict, normalize_targets,
                           save_simmim_state_dict, upsample_mask)
from ..data import build_eval_loader
from ..data.feed import build_feed, to_device
from ..data.masking import MaskGenerator
from ..data.pipeline import mix_seed
from ..distributed import all_reduce_sum
from ..rng import isolated_rng
from ..rundir import RECON_IMAGE, SIMMIM_EXPORT_FILE, VAL_LOSS, VAL_SAMPLES, RunDir, val_key

log = logging.getLogger("train")

EVAL_MASK_SEED = 0  # one fixed set of validation masks for every run: val losses stay comparable
_EPS = 1e-5  # as the loss: / (masked pixels + 1e-5)


@dataclass
class NormTargetConfig:
    enable: bool = True                       # targets: each pixel normalised by its window's mean / std
    window: int = DEFAULT_NORM_TARGET_WINDOW  # odd, centred on the pixel (official NORM_TARGET.PATCH_SIZE)


@dataclass
class SimMIMConfig:
    """`task=simmim` (registered under the `task` group by swinv2_train.config): SimMIM masked image
    modelling (official models/simmim.py and simmim_pretrain__swinv2_base__img192_window12__800ep):
    the head-less encoder + a learnable mask_token + the pixel decoder Conv2d(8C, 32*32*3, 1) ->
    PixelShuffle(32); loss = L1 on masked pixels / (masked pixels x channels). Pair it with the
    paper's light augmentation (data.augment=light); class labels are not needed. The defaults are
    the official SwinV2-B SimMIM values."""

    name: str = "simmim"
    mask_patch_size: int = 32   # masks are drawn per cell of this many pixels (divides model.img_size)
    mask_ratio: float = 0.6     # exactly ceil(ratio x cells) cells masked per image
    norm_target: NormTargetConfig = field(default_factory=NormTargetConfig)
    recon_every: int = 1000     # reconstruction grid (input | masked | reconstruction | target) every N
                                # steps: RUN_DIR/reconstructions/*.png + TensorBoard; 0 off

    @classmethod
    def of(cls, task: Any) -> "SimMIMConfig":
        """The typed settings of a `task` node (this dataclass, a dict or a DictConfig; keys left
        out take the defaults above), checked."""
        if not isinstance(task, cls):
            merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(_plain(task)))
            task = OmegaConf.to_object(merged)
        return task.validate()

    @property
    def norm_target_window(self) -> int:
        """The target normalisation window, 0 when off (targets are the images themselves)."""
        return self.norm_target.window if self.norm_target.enable else 0

    def validate(self) -> "SimMIMConfig":
        window = self.norm_target.window
        if self.norm_target.enable and (window < 1 or window % 2 == 0):
            raise ValueError(f"task.norm_target.window must be a positive odd number, got {window}")
        if self.recon_every < 0:
            raise ValueError(f"task.recon_every must be >= 0 (0: no reconstruction pictures), got {self.recon_every}")
        return self

    def check(self, model_config: Any) -> None:
        """Raise ValueError naming the task key when the settings cannot work with this model
        (called once while the run spec is built)."""
        self.validate()
        MaskGenerator(model_config.img_size, self.mask_patch_size, model_config.patch_size, self.mask_ratio)


def _plain(task: Any) -> Any:
    if OmegaConf.is_config(task):
        return OmegaConf.to_container(task, resolve=True)
    return dataclasses.asdict(task) if dataclasses.is_dataclass(task) else dict(task)


def mask_generator(spec, settings: SimMIMConfig) -> MaskGenerator:
    """The generator the data stream and the evaluation use (one per run)."""
    return MaskGenerator(spec.model.img_size, settings.mask_patch_size, spec.model.patch_size, settings.mask_ratio)


def eval_masks(generator: MaskGenerator, rank: int, batch_index: int, size: int) -> torch.Tensor:
    """(size, h, w) masks of one validation batch: fixed by (rank, batch index, row) only."""
    rngs = (random.Random(mix_seed("simmim-eval", EVAL_MASK_SEED, rank, batch_index, row)) for row in range(size))
    return torch.stack([generator(rng) for rng in rngs])


def build_model(spec, settings: SimMIMConfig) -> SimMIM:
    """The SimMIM model of a run (encoder from spec.model, head-less)."""
    torch.manual_seed(spec.run.seed)  # same init on every rank, as the classifier
    return SimMIM(spec.model, norm_target_window=settings.norm_target_window)


RECON_IMAGES = 4               # rows of a reconstruction grid


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (H, W, C) uint8, min-max scaled per image (inputs are normalised, targets may
    be locally normalised: no fixed range fits all panels)."""
    x = x.detach().float()
    lo, hi = x.min(), x.max()
    return ((x - lo) / (hi - lo).clamp(min=1e-6) * 255).round().clamp(0, 255).byte().permute(1, 2, 0)


def recon_grid(images: torch.Tensor, masks: torch.Tensor, reconstruction: torch.Tensor, patch_size: int,
               norm_target_window: int = 0) -> np.ndarray:
    """(rows x H, 4 x W, C) uint8 picture, one row per image: input | masked input (masked patches
    grey) | reconstruction | target (what the loss compares the reconstruction with, on masked pixels)."""
    images = images.float()
    pixel_mask = upsample_mask(masks, patch_size).to(images.dtype)
    target = normalize_targets(images, norm_target_window) if norm_target_window else images
    rows = []
    for i in range(images.shape[0]):
        masked = images[i] * (1 - pixel_mask[i]) + images[i].min() * pixel_mask[i]
        rows.append(torch.cat([_to_uint8(images[i]), _to_uint8(masked), _to_uint8(reconstruction[i]),
                               _to_uint8(target[i])], dim=1))
    return torch.cat(rows, dim=0).numpy()


def save_png(picture: np.ndarray, path: str) -> str:
    from PIL import Image  # Pillow decodes the shards already; no plotting backend needed

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(picture).save(path)
    return path


class SimMIMTask:
    name = "simmim"
    backbone_prefix = "encoder."        # swinv2.param_groups: mask_token at id 0, decoder at id L+1
    export_file = SIMMIM_EXPORT_FILE    # the official SimMIM state dict (encoder.*, decoder.0.*)
    labels = False                      # the data stream draws masks instead of reading .cls
    Config = SimMIMConfig                # its `task` node

    def __init__(self, spec, env):
        self.spec, self.env = spec, env
        self.device = env.device
        self.settings = SimMIMConfig.of(spec.task)
        self.masks = mask_generator(spec, self.settings)
        self.feed = build_feed(getattr(spec, "data", None))  # uint8 -> normalised (+ erasing if set), on the device
        self._ratio_sum, self._ratio_batches = 0.0, 0
        self._last: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # a few images of the last batch

    # -- the model and its files (the trainer's build / export steps for this task)
    @staticmethod
    def build_model(spec, from_checkpoint: bool = False) -> SimMIM:
        """The SimMIM model; `model.pretrained` (an official SimMIM file) continues pre-training,
        unless resuming (the checkpoint wins)."""
        model = build_model(spec, SimMIMConfig.of(spec.task))
        if getattr(spec, "pretrained", None) and not from_checkpoint:
            dropped = SimMIMTask.load_pretrained(model, spec.pretrained)
            log.info("loaded SimMIM weights %s (window-dependent buffers rebuilt: %d)", spec.pretrained, len(dropped))
        return model

    @staticmethod
    def stream_masks(spec) -> MaskGenerator:
        """What the data stream draws per sample (plain ints: pickles to the workers)."""
        return mask_generator(spec, SimMIMConfig.of(spec.task))

    @staticmethod
    def load_pretrained(model: SimMIM, path: Any) -> list:
        """Continue pre-training from an official SimMIM file; returns the dropped buffer keys."""
        return load_simmim_state_dict(model, path)

    @staticmethod
    def export(source: Any, path: str) -> dict:
        """The official SimMIM state dict of a model or of fp32 trainer weights, written to `path`."""
        return save_simmim_state_dict(source, path)

    # -- the Task protocol
    def batch(self, images: torch.Tensor, masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.masks.token_grid
        if masks.ndim != 3 or tuple(masks.shape) != (images.shape[0], h, h):
            raise ValueError(f"task=simmim needs one (B, {h}, {h}) mask per batch from the data stream; got "
                             f"{tuple(masks.shape)} (a stream that yields class labels does not draw masks)")
        self._ratio_sum += masks.float().mean().item()  # host masks: no device sync
        self._ratio_batches += 1
        x = self.feed(images, self.device)
        self._last = (x[:RECON_IMAGES], masks[:RECON_IMAGES])  # device images: copied back only when drawn
        return x, to_device(masks, self.device)

    def loss(self, model: torch.nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, mask = batch
        return model(x, mask).float()  # SimMIM casts x to its dtype; the targets stay fp32

    def train_metrics(self) -> Dict[str, float]:
        """Mean fraction of masked tokens over the micro-batches since the last call (logged as
        train/mask_ratio next to train/loss, the masked L1)."""
        if not self._ratio_batches:
            return {}
        out = {"train/mask_ratio": self._ratio_sum / self._ratio_batches}
        self._ratio_sum, self._ratio_batches = 0.0, 0
        return out

    def after_step(self, step: int, model: torch.nn.Module, logger: Any) -> Optional[str]:
        """Every `task.recon_every` steps (rank 0): the reconstruction grid of the last training
        batch's first images, to the run dir's reconstruction pictures (rundir) and to the logger (TensorBoard,
        W&B). Returns the PNG path when one was written."""
        every = self.settings.recon_every
        if not every or step % every:
            return None
        return self._draw_reconstruction(step, model, logger)

    def final_pictures(self, step: int, model: torch.nn.Module, logger: Any) -> Optional[str]:
        """The end of the run (swinv2_train.lifecycle.finish): the last step's grid too, when
        task.recon_every did not fall on it (0 keeps them off), so a short run has one."""
        every = self.settings.recon_every
        if not every or not step % every:
            return None
        return self._draw_reconstruction(step, model, logger)

    def _draw_reconstruction(self, step: int, model: torch.nn.Module, logger: Any) -> Optional[str]:
        if self.env.rank != 0 or self._last is None:
            return None
        images, masks = self._last
        was_training = model.training
        model.eval()
        with isolated_rng(), torch.no_grad():
            recon = model.reconstruct(images.to(self.device), masks.to(self.device)).float().cpu()
        model.train(was_training)
        picture = recon_grid(images.float().cpu(), masks, recon, self.spec.model.patch_size, self.settings.norm_target_window)
        path = save_png(picture, RunDir(self.spec.run_dir).reconstruction(step))
        log_image = getattr(logger, "log_image", None)
        if log_image is not None:
            log_image(RECON_IMAGE, picture, step)
        return path

    def evaluate(self, model: torch.nn.Module) -> Dict[str, float]:
        """Masked L1 over the validation set with fixed masks: sum over every masked pixel of the
        set / (masked pixels x channels) (collective)."""
        was_training = model.training
        model.eval()
        sums = [0.0, 0.0, 0.0, 0.0]  # masked |error| sum, masked pixels, images, masked tokens
        with isolated_rng(), torch.no_grad():
            loader = build_eval_loader(self.spec.data, img_size=self.spec.model.img_size,
                                       batch_size=self.spec.batch.eval_batch, rank=self.env.rank,
                                       world_size=self.env.world_size, labels=False, device=self.device)
            for i, (images, _) in enumerate(loader):
                if images.numel() == 0:
                    continue
                mask = eval_masks(self.masks, self.env.rank, i, images.shape[0])
                total, pixels = model.loss_terms(images.to(self.device), mask.to(self.device))
                sums[0] += total.item()
                sums[1] += pixels.item()
                sums[2] += images.shape[0]
                sums[3] += mask.sum().item()
        model.train(was_training)
        s = all_reduce_sum(sums)
        in_chans = self.spec.model.in_chans
        return {VAL_LOSS: s[0] / (s[1] + _EPS) / in_chans, VAL_SAMPLES: s[2],
                val_key("mask_ratio"): s[3] / max(1.0, s[2] * self.masks.token_grid ** 2)}

    def describe(self, m: Dict[str, float]) -> str:
        return (f"val masked L1 {m[VAL_LOSS]:.4f} ({int(m[VAL_SAMPLES])} images, mask ratio "
                f"{m[val_key('mask_ratio')]:.3f})")

    def rng_state(self) -> Dict[str, Any]:
        return {}  # masks come from the data stream (seeded per sample); the task draws nothing

    def set_rng_state(self, state: Dict[str, Any]) -> None:
        pass


__all__ = ["SimMIMTask", "SimMIMConfig", "mask_generator", "eval_masks", "build_model",
           "recon_grid", "EVAL_MASK_SEED"]

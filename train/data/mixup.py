"""Batch Mixup / CutMix with label smoothing, applied on device (timm `Mixup`, mode='batch').

One lambda per batch; sample i is mixed with sample B-1-i (the flipped batch). With both alphas
> 0, CutMix is chosen with prob `switch_prob`. CutMix's lambda is corrected to the exact pasted
area after clipping the box, so the soft targets match the pixel mixture.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional, Tuple

import numpy as np
import torch


def smooth_one_hot(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y = torch.full((targets.shape[0], num_classes), off, device=targets.device, dtype=torch.float32)
    return y.scatter_(1, targets.long().view(-1, 1), on)


class Mixup:
    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, prob: float = 1.0):
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.switch_prob, self.smoothing, self.prob = switch_prob, label_smoothing, prob
        self.last_lam: float = 1.0
        self.last_box: Optional[Tuple[int, int, int, int]] = None

    def _np_rng(self, generator: Optional[torch.Generator]) -> np.random.Generator:
        # Beta sampling needs numpy. It is seeded from the torch generator's state (saved with the
        # task's RNG state, so resume replays it), which then moves on: no tensor is read back, so
        # drawing the batch's parameters never waits for the device.
        generator = generator if generator is not None else torch.default_generator
        digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        generator.manual_seed(int(rng.integers(2**62)))
        return rng

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, targets: torch.Tensor,
                 generator: Optional[torch.Generator] = None):
        if images.shape[0] != targets.shape[0]:
            raise ValueError("images and targets batch sizes differ")
        rng = self._np_rng(generator)
        lam, use_cutmix = 1.0, False
        if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix = rng.random() < self.switch_prob
            else:
                use_cutmix = self.cutmix_alpha > 0
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            if rng.random() < self.prob:
                lam = float(rng.beta(alpha, alpha))
        self.last_box = None
        if lam < 1.0:
            flipped = images.flip(0)
            if use_cutmix:
                H, W = images.shape[-2:]
                cut = math.sqrt(1.0 - lam)
                ch, cw = int(H * cut), int(W * cut)
                cy, cx = int(rng.integers(0, H)), int(rng.integers(0, W))
                y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
                x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
                images = images.clone()
                images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)
                self.last_box = (y0, y1, x0, x1)
            else:
                images = images * lam + flipped * (1.0 - lam)
        self.last_lam = lam
        y1 = smooth_one_hot(targets, self.num_classes, self.smoothing)
        y2 = y1.flip(0)
        return images, y1 * lam + y2 * (1.0 - lam)


def build_mixup(cfg, num_classes: int) -> Optional[Mixup]:
    """Mixup/CutMix + label smoothing for a DataConfig; None when mixup, cutmix and label
    smoothing are all off (then plain integer-target cross-entropy applies). Smoothing alone
    returns a callable that only produces smoothed one-hot targets."""
    from .config import as_data_config

    c = as_data_config(cfg).resolved()
    if c.mixup <= 0 and c.cutmix <= 0 and c.label_smoothing <= 0:
        return None
    return Mixup(num_classes, mixup_alpha=c.mixup, cutmix_alpha=c.cutmix,
                 switch_prob=c.mixup_switch_prob, label_smoothing=c.label_smoothing)

"""SimMIM random masks, drawn in the data workers (official ``data/data_simmim_pt.py`` MaskGenerator).

The image is cut into mask patches of ``mask_patch_size`` pixels: a grid of
``input_size / mask_patch_size`` cells per side. Exactly ``ceil(cells * mask_ratio)`` distinct
cells are masked, chosen uniformly at random (the official values: SimMIMConfig's defaults); the cell mask is then repeated
``mask_patch_size / model_patch_size`` times along each axis, giving one 0/1 entry per patch token
of the model ((input_size / model_patch_size)^2 entries).

Randomness is explicit: a mask is a pure function of the ``random.Random`` it is given. The
stream gives each sample its own generator seeded by (seed, epoch, stream, index in the stream)
(:func:`sample_mask_rng`), so a sample's mask does not depend on which worker or rank decodes it,
and a resumed stream (which skips to its saved offsets) draws the same masks as an uninterrupted one.
"""
from __future__ import annotations

import math
import random
from typing import Any, Union

import torch

__all__ = ["MaskGenerator", "sample_mask_rng"]

RandomSource = Union[random.Random, int]


def sample_mask_rng(seed: int, epoch: int, stream: int, index: int) -> random.Random:
    """The generator of one sample's mask: seeded by where the sample is in the epoch's order,
    namespaced "mask" so that masks and augmentations are independent draws."""
    from .pipeline import mix_seed  # late import: pipeline may import this module

    return random.Random(mix_seed("mask", seed, epoch, stream, index))


class MaskGenerator:
    """``MaskGenerator(input_size, mask_patch_size, model_patch_size, mask_ratio)(rng)`` ->
    a (input_size / model_patch_size)^2 bool tensor, True = masked token."""

    def __init__(self, input_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float):
        _check_geometry(input_size, mask_patch_size, model_patch_size, mask_ratio)
        self.input_size, self.mask_patch_size = input_size, mask_patch_size
        self.model_patch_size, self.mask_ratio = model_patch_size, mask_ratio
        self.cells_per_side = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size  # tokens per mask patch, per axis
        self.num_cells = self.cells_per_side ** 2
        self.num_masked = int(math.ceil(self.num_cells * mask_ratio))

    @property
    def token_grid(self) -> int:
        return self.input_size // self.model_patch_size

    def cell_mask(self, rng: RandomSource) -> torch.Tensor:
        """(cells, cells) bool: exactly `num_masked` cells True."""
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        cells = torch.zeros(self.num_cells, dtype=torch.bool)
        cells[rng.sample(range(self.num_cells), self.num_masked)] = True
        return cells.view(self.cells_per_side, self.cells_per_side)

    def __call__(self, rng: RandomSource) -> torch.Tensor:
        cells = self.cell_mask(rng)
        return cells.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)

    def __repr__(self) -> str:
        return (f"MaskGenerator(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
                f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})")


def _check_geometry(input_size: Any, mask_patch_size: Any, model_patch_size: Any, mask_ratio: Any) -> None:
    for name, value in (("input size (model.img_size)", input_size), ("task.mask_patch_size", mask_patch_size),
                        ("model.patch_size", model_patch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if input_size % mask_patch_size:
        raise ValueError(f"task.mask_patch_size={mask_patch_size} must divide the input size {input_size}")
    if mask_patch_size % model_patch_size:
        raise ValueError(f"task.mask_patch_size={mask_patch_size} must be a multiple of model.patch_size="
                         f"{model_patch_size} (a mask patch covers whole patch tokens)")
    if not isinstance(mask_ratio, (int, float)) or isinstance(mask_ratio, bool) or not 0 < mask_ratio < 1:
        raise ValueError(f"task.mask_ratio must be in (0, 1), got {mask_ratio!r}")

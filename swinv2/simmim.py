"""SimMIM masked-image-modelling pre-training around a SwinV2 backbone (imports torch only).

Mirrors the official ``models/simmim.py`` (microsoft/Swin-Transformer), whose state dict is the
contract:

* ``SwinTransformerV2ForSimMIM``: the backbone built with ``num_classes=0`` (no head) plus a
  learnable ``mask_token`` (1, 1, C), zero then trunc_normal(std 0.02). After ``patch_embed`` every
  masked token is replaced by it (``x * (1 - w) + mask_token * w``), then the stages and the final
  norm run as usual and the tokens come back as a (B, 8C, H/32, W/32) map.
* ``SimMIM``: ``encoder`` + ``decoder`` = ``Conv2d(8C, stride**2 * 3, 1)`` + ``PixelShuffle(stride)``
  (stride 32: patch 4 times three 2x mergings) reconstructing the image from that map.
* loss: L1 between the reconstruction and the image (or its locally normalised version, see
  :func:`normalize_targets`), on masked pixels only, summed and divided by
  ``(masked pixels + 1e-5) * in_chans``.

``SimMIM(...).state_dict()`` has exactly the official keys: ``encoder.<backbone keys, buffers
included>``, ``encoder.mask_token``, ``decoder.0.weight``, ``decoder.0.bias``. The backbone class
itself is unchanged: a SimMIM checkpoint fine-tunes through ``load_official_state_dict`` (which
drops ``encoder.mask_token`` and ``decoder.*`` and says so).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import SwinV2Config
from .model import SwinTransformerV2
from .weights import (BUFFER_KEYWORDS, CheckpointMismatchError, _unwrap_model, portable_state_dict, strip_wrappers,
                      unwrap_checkpoint, write_checkpoint)

__all__ = ["SwinTransformerV2ForSimMIM", "SimMIM", "create_simmim", "normalize_targets", "masked_l1_terms",
           "simmim_loss", "upsample_mask", "simmim_state_dict", "save_simmim_state_dict",
           "load_simmim_state_dict", "DEFAULT_NORM_TARGET_WINDOW"]

#: official NORM_TARGET.PATCH_SIZE of the SwinV2 SimMIM configs
DEFAULT_NORM_TARGET_WINDOW = 47
_LOSS_EPS = 1e-5  # official: ... / (mask.sum() + 1e-5) / in_chans
_VAR_EPS = 1e-6  # official norm_targets: (x - mean) / sqrt(var + 1e-6)
# Key components inserted by wrappers (DDP / DeepSpeed, torch.compile, activation checkpointing, FSDP)
class SwinTransformerV2ForSimMIM(SwinTransformerV2):
    """The backbone without a head, with ``mask_token`` replacing masked patch embeddings."""

    def __init__(self, config: SwinV2Config):
        if config.num_classes != 0:
            raise ValueError(f"the SimMIM encoder has no classification head: build it with num_classes=0, "
                             f"got {config.num_classes}")
        super().__init__(config)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        nn.init.trunc_normal_(self.mask_token, mean=0.0, std=0.02)

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.patch_embed.patches_resolution

    def check_mask(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        h, w = self.token_grid
        if not torch.is_tensor(mask) or mask.ndim != 3 or tuple(mask.shape) != (x.shape[0], h, w):
            got = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(f"SimMIM mask must be (B, {h}, {w}) = one 0/1 entry per patch token of the "
                             f"{x.shape[0]} images, got {got}")

    def embed_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """patch_embed, then masked tokens -> mask_token (a blend, as official), then pos_drop."""
        self._check_input(x)
        self.check_mask(x, mask)
        tokens = self.patch_embed(x)
        B, L, _ = tokens.shape
        mask_tokens = self.mask_token.expand(B, L, -1)
        w = mask.flatten(1).unsqueeze(-1).type_as(mask_tokens)
        return self.pos_drop(tokens * (1.0 - w) + mask_tokens * w)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) images and (B, H/p, W/p) masks -> (B, num_features, H/32, W/32)."""
        tokens = self.embed_masked(x, mask)
        for layer in self.layers:
            tokens = layer(tokens)
        tokens = self.norm(tokens)
        H, W = self.layers[-1].input_resolution
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.num_features, H, W)


def normalize_targets(images: torch.Tensor, window: int) -> torch.Tensor:
    """Official optional target normalisation: every pixel (per channel) minus the mean of the
    ``window`` x ``window`` neighbourhood centred on it, divided by sqrt(unbiased variance + 1e-6).

    Neighbourhoods are cut at the image border: mean and variance use the n pixels inside the
    image (variance with the n / (n - 1) correction, clamped at 0). Computed in fp32."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the target normalisation window must be odd (centred on the pixel), got {window}")
    x = images.float()
    pad = window // 2
    mean = F.avg_pool2d(x, window, stride=1, padding=pad, count_include_pad=False)
    mean_sq = F.avg_pool2d(x * x, window, stride=1, padding=pad, count_include_pad=False)
    ones = torch.ones_like(x[:, :1])
    count = F.avg_pool2d(ones, window, stride=1, padding=pad, count_include_pad=True) * (window * window)
    # a 1x1 window has n = 1: no spread to measure (variance 0, as the clamp below would give)
    correction = count / (count - 1).clamp(min=1)
    var = ((mean_sq - mean * mean) * correction).clamp(min=0.0)
    return (x - mean) / torch.sqrt(var + _VAR_EPS)


def upsample_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, h, w) token mask -> (B, 1, h*p, w*p) pixel mask (each token covers p x p pixels)."""
    return mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)


def masked_l1_terms(images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor, patch_size: int,
                    norm_target_window: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of |target - reconstruction| over masked pixels and channels, number of masked pixels),
    both fp32 scalars. The loss is ``terms[0] / (terms[1] + 1e-5) / in_chans``; evaluation sums the
    two terms over the validation set first."""
    target = normalize_targets(images, norm_target_window) if norm_target_window else images.float()
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and images {tuple(target.shape)} differ")
    pixel_mask = upsample_mask(mask, patch_size).to(torch.float32)
    l1 = F.l1_loss(target, reconstruction.float(), reduction="none")
    return (l1 * pixel_mask).sum(), pixel_mask.sum()


def simmim_loss(images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor, patch_size: int,
                norm_target_window: int = 0) -> torch.Tensor:
    """The official loss: masked L1 sum / (masked pixels + 1e-5) / channels."""
    total, pixels = masked_l1_terms(images, reconstruction, mask, patch_size, norm_target_window)
    return total / (pixels + _LOSS_EPS) / images.shape[1]


class SimMIM(nn.Module):
    """``encoder`` (:class:`SwinTransformerV2ForSimMIM`) + pixel ``decoder``; ``forward(x, mask)``
    returns the official loss. ``norm_target_window`` (0 = off, official 47) is a setting, not state."""

    def __init__(self, config: SwinV2Config, norm_target_window: int = 0):
        super().__init__()
        config = dataclasses.replace(config, num_classes=0)
        if norm_target_window and norm_target_window % 2 == 0:
            raise ValueError(f"norm_target_window must be odd or 0 (off), got {norm_target_window}")
        self.encoder = SwinTransformerV2ForSimMIM(config)
        self.encoder_stride = config.patch_size * 2 ** (config.num_stages - 1)  # 32 for every official model
        self.patch_size, self.in_chans = config.patch_size, config.in_chans
        self.norm_target_window = int(norm_target_window)
        self.decoder = nn.Sequential(
            nn.Conv2d(self.encoder.num_features, self.encoder_stride ** 2 * config.in_chans, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride))

    @property
    def config(self) -> SwinV2Config:
        return self.encoder.config

    @property
    def layers(self) -> nn.ModuleList:
        # The encoder's stages (not a second registration: no state-dict keys), so that
        # swinv2.iter_blocks / apply_activation_checkpointing / probes accept the SimMIM model.
        return self.encoder.layers

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The decoder's image (B, in_chans, H, W), in the model's dtype."""
        dtype = self.encoder.patch_embed.proj.weight.dtype
        return self.decoder(self.encoder(x.to(dtype), mask))

    def loss_terms(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`masked_l1_terms` of this model on (x, mask); the targets are x as given (fp32)."""
        return masked_l1_terms(x, self.reconstruct(x, mask), mask, self.patch_size, self.norm_target_window)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scalar fp32 loss (official ``SimMIM.forward``)."""
        total, pixels = self.loss_terms(x, mask)
        return total / (pixels + _LOSS_EPS) / self.in_chans

    def extra_repr(self) -> str:
        return f"encoder_stride={self.encoder_stride}, norm_target_window={self.norm_target_window}"


def create_simmim(variant: str, img_size: int = 192, window_size: int = 12, norm_target_window: int = 0,
                  **config_overrides: Any) -> SimMIM:
    """A SimMIM model of a paper variant (official SwinV2-B recipe: 192 / W12, norm target 47)."""
    config = SwinV2Config.from_variant(variant, img_size=img_size, window_size=window_size, num_classes=0,
                                       **config_overrides)
    return SimMIM(config, norm_target_window=norm_target_window)


# --------------------------------------------------------------------------------------------
# the official SimMIM checkpoint format
# --------------------------------------------------------------------------------------------


def simmim_state_dict(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"model": state_dict}`` in the official SimMIM format (``encoder.*``, ``decoder.0.*``):
    wrapper components removed (the ``encoder.`` prefix is kept, unlike
    :func:`swinv2.official_state_dict`), contiguous CPU tensors, floating point as fp32, buffers
    included. Accepts a model or a state dict (e.g. the fp32 weights of a trainer checkpoint)."""
    out = portable_state_dict(model, strip_wrappers, "SimMIM")["model"]
    if not any(k.startswith("encoder.") for k in out) or "encoder.mask_token" not in out:
        raise ValueError("not a SimMIM model / state dict: expected encoder.* keys with encoder.mask_token")
    return {"model": out}


def save_simmim_state_dict(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> dict:
    """Write :func:`simmim_state_dict` to ``path`` (atomically); returns what was saved."""
    return write_checkpoint(simmim_state_dict(model), path)


def load_simmim_state_dict(model: SimMIM, state_dict: Any) -> list[str]:
    """Load an official SimMIM checkpoint (dict or path) into a :class:`SimMIM` model, to continue
    pre-training. Strict on parameters; the window-dependent buffers are the model's own (rebuilt
    for its window), as in :func:`swinv2.load_official_state_dict`. Returns the dropped buffer keys."""
    raw = unwrap_checkpoint(state_dict)
    values = {strip_wrappers(k).replace(".rpe_mlp.", ".cpb_mlp."): v for k, v in raw.items()}
    dropped = sorted(k for k in values if any(word in k for word in BUFFER_KEYWORDS))
    values = {k: v for k, v in values.items() if k not in dropped}
    own = {k for k in _unwrap_model(model).state_dict() if not any(word in k for word in BUFFER_KEYWORDS)}
    missing, unexpected = sorted(own - values.keys()), sorted(values.keys() - own)
    if missing or unexpected:
        raise CheckpointMismatchError(f"SimMIM checkpoint does not match the model: missing {missing[:12]}, "
                                      f"unexpected {unexpected[:12]}")
    _unwrap_model(model).load_state_dict(values, strict=False)
    return dropped

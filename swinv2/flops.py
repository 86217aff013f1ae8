"""Analytic FLOPs, following the official `swin_transformer_v2.py` flops() methods term by term.

The official formula counts multiply-accumulates of the matmuls plus one op per element for
LayerNorms; it ignores the CPB MLP, softmax, GELU and the head-count (except via head_dim*nH = C).
Its final-norm term uses patches_res^2 // 2**num_stages (not the real last-stage size); kept as is
so the numbers match the published tables.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

from torch import nn

from .config import SwinV2Config


def _attention_flops(dim: int, num_heads: int, n: int) -> float:
    hd = dim // num_heads
    return (n * dim * 3 * dim          # qkv
            + num_heads * n * hd * n   # q @ k^T
            + num_heads * n * n * hd   # attn @ v
            + n * dim * dim)           # proj


def flops(config_or_model: Union[SwinV2Config, nn.Module], img_size: Optional[int] = None) -> int:
    """FLOPs of one image forward (official formula). `img_size` overrides the config's (same window)."""
    config = getattr(config_or_model, "config", config_or_model)
    if not isinstance(config, SwinV2Config):
        raise TypeError(f"flops() needs a SwinV2Config or a SwinTransformerV2, got {type(config_or_model).__name__}")
    if img_size is not None and img_size != config.img_size:
        config = dataclasses.replace(config, img_size=img_size)  # re-validates the geometry
    c = config
    pr = c.patches_resolution
    total = pr * pr * c.embed_dim * c.in_chans * c.patch_size**2 + pr * pr * c.embed_dim  # patch embed + norm
    for i in range(c.num_stages):
        dim, res = c.stage_dim(i), c.stage_resolution(i)
        geo = c.stage_window(i)
        win = geo.window
        n_windows = geo.padded(res) ** 2 / win / win  # padded tokens are attended (and masked) too
        block = (dim * res * res                                      # norm1
                 + n_windows * _attention_flops(dim, c.num_heads[i], win * win)
                 + 2 * res * res * dim * dim * c.mlp_ratio             # mlp
                 + dim * res * res)                                    # norm2
        total += c.depths[i] * block
        if i < c.num_stages - 1:  # patch merging (V2: reduction then norm)
            total += (res // 2) * (res // 2) * 4 * dim * 2 * dim + res * res * dim // 2
    total += c.num_features * pr * pr // 2**c.num_stages  # final norm (official term)
    total += c.num_features * c.num_classes               # head
    return int(total)

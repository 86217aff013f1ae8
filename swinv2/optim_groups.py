"""Optimizer parameter groups: the official weight-decay exclusions and layer-wise LR decay.

Pure functions of parameter names (and the stage depths), so the trainer, SimMIM and tests share
one rule. Layer ids follow the official `get_swin_layer` (optimizer.py of microsoft/Swin-Transformer,
used with TRAIN.LAYER_DECAY < 1), see docs/swinv2-reference.md section 5.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

# exact names (relative to the backbone): official no_weight_decay() sets; SimMIM adds mask_token
_NO_DECAY_NAMES = ("absolute_pos_embed", "mask_token")
_NO_DECAY_KEYWORDS = ("cpb_mlp", "logit_scale", "relative_position_bias_table")
_OUTSIDE = "<outside>."  # marks a name outside `backbone_prefix`: no layer rule matches it (id L + 1)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Official exclusions: 1-D params, *.bias, absolute_pos_embed / mask_token, names with a CPB/scale keyword."""
    return (param.ndim <= 1 or name.endswith(".bias") or name in _NO_DECAY_NAMES
            or any(k in name for k in _NO_DECAY_KEYWORDS))


def layer_id(name: str, depths: Sequence[int]) -> int:
    """Official layer id 0..L+1 (L = sum(depths)) of a backbone parameter name.

    The stem (patch_embed, mask_token) is 0, block j of stage i is sum(depths[:i]) + j + 1, a stage's
    downsample shares the id of that stage's LAST block (in V2 it ends the stage), and everything
    after the stages (final norm, head) is L + 1."""
    if name == "mask_token" or name.startswith("patch_embed."):
        return 0
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) > 3:
        stage = int(parts[1])
        if parts[2] == "downsample":
            return sum(depths[:stage + 1])
        if parts[2] == "blocks":
            return sum(depths[:stage]) + int(parts[3]) + 1
    return sum(depths) + 1


def layer_scale(layer: int, depths: Sequence[int], layer_decay: float) -> float:
    """LR multiplier of layer id `layer`: layer_decay ** (L + 1 - layer), so the head's is 1."""
    return float(layer_decay) ** (sum(depths) + 1 - layer)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0, *,
                 depths: Optional[Sequence[int]] = None, backbone_prefix: str = "") -> list[dict[str, Any]]:
    """Optimizer groups with the official weight-decay exclusions, each with its `lr_scale`.

    layer_decay == 1 (off): [{decay params, weight_decay}, {the rest, weight_decay 0}], lr_scale 1.
    layer_decay < 1: for every layer id in ascending order its decay and no_decay groups (empty ones
    omitted), each with `layer_id` and `lr_scale` = layer_decay ** (L + 1 - id). Whoever sets the
    learning rate multiplies the scheduled LR by `lr_scale`.

    `depths`: the stage depths (default: model.config.depths). `backbone_prefix`: stripped from the
    names before both rules (e.g. "encoder." for a wrapper); names without it go to id L + 1."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay: must be in (0, 1] (1 = off), got {layer_decay}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if backbone_prefix:
        named = [(n[len(backbone_prefix):] if n.startswith(backbone_prefix) else _OUTSIDE + n, p) for n, p in named]
    if layer_decay == 1.0:
        decay = [p for n, p in named if not no_weight_decay(n, p)]
        no_decay = [p for n, p in named if no_weight_decay(n, p)]
        return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
                {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    if depths is None:
        if not hasattr(model, "config"):
            raise ValueError("depths: layer-wise LR decay needs the stage depths; pass depths= for a model "
                             "without a SwinV2Config `config`")
        depths = model.config.depths
    groups: dict[tuple[int, bool], list[torch.Tensor]] = {}
    for n, p in named:
        groups.setdefault((layer_id(n, depths), no_weight_decay(n, p)), []).append(p)
    return [{"params": params, "weight_decay": 0.0 if skip else weight_decay, "layer_id": lid,
             "lr_scale": layer_scale(lid, depths, layer_decay)}
            for (lid, skip), params in sorted(groups.items())]


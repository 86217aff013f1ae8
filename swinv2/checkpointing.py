"""Activation checkpointing applied from outside the model.

Each selected block gets an instance-level `forward` that runs the class's forward under
non-reentrant `torch.utils.checkpoint`. No module is wrapped or renamed, so `state_dict()` keys are
unchanged, forward hooks on the block (probes) still fire exactly once per forward, and the block's
own code carries no checkpoint flag.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .model import iter_blocks

_FLAG = "_swinv2_activation_checkpointing"


def _checkpointed_forward(block: nn.Module):
    plain = type(block).forward  # the unbound class forward; recompute calls it without hooks

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # nothing to save for backward: skip the bookkeeping
            return plain(block, *args, **kwargs)
        return checkpoint(plain, block, *args, use_reentrant=False, **kwargs)

    return forward


def apply_activation_checkpointing(model: nn.Module, every: int = 1, stages: Optional[Iterable[int]] = None) -> int:
    """Checkpoint the blocks whose global index (as in `iter_blocks`) is a multiple of `every`,
    optionally only those in `stages`. Idempotent; returns the number of blocks checkpointed by this call."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    n_stages = len(model.layers)
    selected = set(range(n_stages)) if stages is None else set(stages)
    bad = sorted(s for s in selected if not 0 <= s < n_stages)
    if bad:
        raise ValueError(f"stages {bad} out of range: the model has stages 0..{n_stages - 1}")
    wrapped = 0
    for idx, name, blk in iter_blocks(model):
        stage = int(name.split(".")[1])
        if stage not in selected or idx % every or getattr(blk, _FLAG, False):
            continue
        blk.forward = _checkpointed_forward(blk)
        setattr(blk, _FLAG, True)
        wrapped += 1
    return wrapped


def remove_activation_checkpointing(model: nn.Module) -> int:
    """Undo apply_activation_checkpointing; returns the number of blocks restored."""
    restored = 0
    for _, _, blk in iter_blocks(model):
        if getattr(blk, _FLAG, False):
            del blk.forward
            delattr(blk, _FLAG)
            restored += 1
    return restored


def is_checkpointed(block: nn.Module) -> bool:
    return bool(getattr(block, _FLAG, False))

"""Per-block activation amplitude statistics via forward hooks (the model is not modified).

The statistics are of each block's output, i.e. the main branch that res-post-norm is meant to
keep bounded. They are computed on the detached output under no_grad and kept as 0-d tensors;
`.stats()` converts them to floats (one device sync per call, not per block).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import LOGIT_SCALE_MAX
from .model import iter_blocks


def amplitude_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """mean |x|, RMS and max |x| of a tensor, as float32 0-d tensors."""
    with torch.no_grad():
        a = x.detach().float().abs()
        return {"mean_abs": a.mean(), "rms": a.square().mean().sqrt(), "max": a.max()}


class AmplitudeProbe:
    """Records amplitude stats of every block output on each forward.

    Use as `with AmplitudeProbe(model) as probe: model(x); probe.stats()` or attach()/remove().
    Works with activation checkpointing (hooks fire on the outer call only, not on recompute).
    """

    def __init__(self, model: nn.Module, attach: bool = False):
        self.model = model
        self._handles: list = []
        self._latest: dict[int, dict[str, torch.Tensor]] = {}
        if attach:
            self.attach()

    def _hook(self, index: int):
        def hook(module, inputs, output):
            self._latest[index] = amplitude_stats(output)
        return hook

    def attach(self) -> "AmplitudeProbe":
        if not self._handles:
            for ref in iter_blocks(self.model):
                self._handles.append(ref.block.register_forward_hook(self._hook(ref.index)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def clear(self) -> None:
        self._latest.clear()

    def stats(self) -> dict[int, dict[str, float]]:
        """{block_index: {"mean_abs", "rms", "max"}} for the latest forward (empty before one)."""
        return {i: {k: float(v) for k, v in s.items()} for i, s in sorted(self._latest.items())}

    def __enter__(self) -> "AmplitudeProbe":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()


def logit_scales(model: nn.Module) -> dict[int, list[float]]:
    """{block_index: per-head exp(clamp(logit_scale, max=ln 100))}; blocks with dot attention are skipped."""
    out = {}
    for ref in iter_blocks(model):
        ls: Optional[torch.Tensor] = getattr(ref.block.attn, "logit_scale", None)
        if ls is not None:
            with torch.no_grad():
                out[ref.index] = torch.clamp(ls.detach().float(), max=LOGIT_SCALE_MAX).exp().flatten().tolist()
    return out

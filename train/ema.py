"""EMA of weights (`train.ema_decay`, off by default: no official SwinV2 recipe uses one).

    ema = build_ema(spec, engine.module, resume_dir)   # None when off; after the weights are restored
    ema.update(engine.module)                          # after every APPLIED optimizer step
    with ema.swapped_in(engine.module): task.evaluate(engine.module)   # -> val_ema/*
    ema.state_dict() -> ema.pt in each checkpoint folder (rank 0; in the commit marker's checksums)

What is averaged: every floating-point parameter and persistent buffer of the model (official
state-dict names), held in fp32. Integer and bool buffers (`relative_position_index`, int64) are
copied, never averaged: the official repository's EMA averaged that index buffer and lost accuracy
(microsoft/Swin-Transformer #111); timm's ModelEmaV3 likewise updates floating-point tensors only.
Non-persistent buffers (the int8 shift-window region ids) and the state-dict entries derived from
them (the dense `attn_mask`, built by each state_dict() call) are not kept: they are geometry, not
learnt; the export takes them from the checkpoint's raw weights. The update is `ema.lerp_(w, 1 - d)`, i.e. ema = d * ema + (1 - d) * w, and lerp
leaves a tensor bit-exact when ema == w, so constant float buffers (`relative_coords_table`) never
drift by rounding.

Warm-up (`train.ema_warmup`, default on): the decay of update n (0-based) is
min(decay, (1 + n) / (10 + n)), TensorFlow's ExponentialMovingAverage(num_updates) rule. Without
it, at decay 0.9998 the initial (random or pre-trained) weights still hold 0.9998^5000 = 37% of
the average after a 5000-step fine-tune; with it their share is gone within tens of steps and the
full decay is reached after ~45k updates. (timm's ModelEmaV3 warm-up, 1 - (1 + n)^(-2/3), needs
~350k updates to reach 0.9998: too slow for the fine-tuning recipes here.)

ZeRO-1 and more than one rank: ZeRO-1 partitions the optimizer state only; after each step every
rank all-gathers the updated weights, so `engine.module` holds the same full weights on every rank.
Each rank therefore keeps its own full EMA, updated identically (same inputs, same code), with no
collective; rank 0 saves it and every rank loads it on resume. Cost: one fp32 copy of the model
per rank (4 bytes per parameter: 12 GB for SwinV2-G's 3B), plus, while the EMA is evaluated, a
transient copy of the raw weights in the module's dtype. `rank_spread` (max - min over ranks of
a checksum, logged as `ema/rank_spread`) checks that the ranks agree.

Under bf16/fp16 the average is of the module's half-precision weights (the ones the forward
pass uses; the fp32 masters are partitioned over ranks), accumulated in fp32.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional

import torch

from . import distributed
from .errors import CheckpointError
from .rundir import EMA_FILE, ema_key

log = logging.getLogger(__name__)



def warmup_decay(decay: float, updates: int, warmup: bool = True) -> float:
    """The decay of the update after `updates` earlier ones: min(decay, (1 + n) / (10 + n))."""
    return min(decay, (1.0 + updates) / (10.0 + updates)) if warmup else decay


class ModelEma:
    """An fp32 exponential moving average of a module's state dict (float entries averaged,
    integer / bool entries copied)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.last_decay: Optional[float] = None
        self.tensors: Dict[str, torch.Tensor] = {
            k: v.detach().to(torch.float32, copy=True) if v.is_floating_point() else v.detach().clone()
            for k, v in live_tensors(model).items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One step of the average towards `model`'s current weights. Call it only after an
        applied optimizer step (a skipped one left the weights as they were)."""
        d = warmup_decay(self.decay, self.updates, self.warmup)
        # tensor by tensor: a half-precision weight is widened one at a time, not the whole model at once
        for k, w in live_tensors(model).items():
            e = self.tensors[k]
            if e.is_floating_point():
                e.lerp_(w.detach().to(e.dtype), 1.0 - d)
            else:
                e.copy_(w)
        self.updates += 1
        self.last_decay = d

    @contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """`model` holds the EMA weights inside the block and its own, bit for bit, after it.
        In-place copies: the parameters stay the same tensors (ZeRO's flat buffers hold views of them)."""
        live = live_tensors(model)
        raw = {k: v.detach().clone() for k, v in live.items() if v.is_floating_point()}
        try:
            with torch.no_grad():
                for k in raw:
                    live[k].copy_(self.tensors[k])
            yield model
        finally:
            with torch.no_grad():
                for k, v in raw.items():
                    live[k].copy_(v)

    def weights(self) -> Dict[str, torch.Tensor]:
        """The averaged parameters and persistent buffers on the CPU (official key names)."""
        return {k: v.detach().cpu().clone() for k, v in self.tensors.items()}

    def state_dict(self) -> Dict[str, object]:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "weights": self.weights()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """The saved average and update count; the decay and warm-up stay this run's (config)."""
        saved = state["weights"]
        missing, extra = sorted(set(self.tensors) - set(saved)), sorted(set(saved) - set(self.tensors))
        if missing or extra:
            raise ValueError(f"EMA state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for k, e in self.tensors.items():
            if saved[k].shape != e.shape:
                raise ValueError(f"EMA state does not fit the model: {k} {tuple(saved[k].shape)} vs {tuple(e.shape)}")
            e.copy_(saved[k])
        self.updates = int(state["updates"])

    def fingerprint(self) -> float:
        """A checksum of the average (float64 sum of every entry, weighted by position in the
        dict so that swapped tensors differ): equal on ranks that hold equal EMAs."""
        return float(sum((i + 1) * v.double().sum().item() for i, v in enumerate(self.tensors.values())))


def live_tensors(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """{state-dict name: tensor} of the parameters and persistent buffers, the module's own tensors
    (no copy; model.state_dict() would also build derived entries such as the dense attn_mask)."""
    out = dict(model.named_parameters())
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


# ----------------------------------------------------------------------------- trainer glue
def build_ema(spec, model: torch.nn.Module, resume_dir: Optional[str]) -> Optional[ModelEma]:
    """None when train.ema_decay is off. Call it after the checkpoint is loaded: a resumed run
    takes the saved EMA; a checkpoint without one (EMA switched on later) starts the average at
    the resumed weights."""
    decay = spec.train.ema_decay
    if not decay:
        return None
    ema = ModelEma(model, decay, spec.train.ema_warmup)
    path = os.path.join(resume_dir, EMA_FILE) if resume_dir is not None else None
    if path is not None and os.path.isfile(path):
        try:
            ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        except (OSError, RuntimeError, KeyError, ValueError, EOFError) as e:
            raise CheckpointError(f"cannot load the EMA weights {path} ({e}); move that checkpoint away to resume "
                                  "from the previous one, or set train.ema_decay=null to go on without EMA") from e
    elif path is not None:
        log.warning("%s has no %s (written without train.ema_decay): the EMA starts at the resumed weights",
                    resume_dir, EMA_FILE)
    return ema


def ema_metrics(val: Dict[str, float]) -> Dict[str, float]:
    """The task's validation metrics under the EMA's names: val/top1 -> val_ema/top1."""
    return {ema_key(k): v for k, v in val.items()}


def rank_spread(ema: ModelEma, max_over_ranks: Callable = distributed.all_reduce_max_list) -> float:
    """Collective: max - min over ranks of the EMA's fingerprint (0.0 when every rank agrees)."""
    f = ema.fingerprint()
    hi, neg_lo = max_over_ranks([f, -f])
    return hi + neg_lo


def evaluate_ema(ema: ModelEma, model: torch.nn.Module, evaluate: Callable) -> Dict[str, Dict[str, float]]:
    """Collective: `evaluate` (the task's) with the EMA weights swapped in. Returns the task's own
    metrics (for its log line) and the ones to log: val_ema/*, ema/decay, ema/rank_spread."""
    with ema.swapped_in(model):
        val = evaluate(model)
    logged = {**ema_metrics(val), "ema/rank_spread": rank_spread(ema),
              "ema/decay": ema.last_decay if ema.last_decay is not None else 0.0}
    return {"val": val, "logged": logged}

"""The way from the data workers into the device.

* Workers hand over uint8 (3, S, S) pixels, 1 byte a pixel, and per sample its random-erasing box
  (`transforms.erase_box`: drawn in the worker from the sample's own generator, in the order the
  reference transform draws it). The stream attaches a micro-batch's boxes to its images
  (`attach_erase`; `erase_boxes(images)` reads them): `TrainStream.next_batch()` stays
  (images, targets).
* `DeviceFeed` turns a uint8 batch into the model's input on the device: float, /255, - mean,
  / std (the reference's order, so the values are bit-identical), then each box filled with its
  N(0,1) noise, drawn from a CPU generator seeded with the box's seed (as the reference does), so
  the same seed gives the same tensors on every device and resume stays exact.
* `ChunkMover`: on CUDA the stream copies the next global batch's chunks (pinned by the
  DataLoader's pin thread when `data.pin_memory`) to the device, `non_blocking`, on a side
  stream, while the current step runs; the batch is assembled on the device. On the CPU it moves
  nothing (tests run its logic with device=cpu).
* Cores: `auto_workers()` is `data.num_workers=auto`; `check_worker_cores` warns once when the
  data workers and the main process need more cores than this process may run on.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Sequence

import torch

from .transforms import erase_noise

log = logging.getLogger(__name__)

ERASE_ATTR = "erase_boxes"  # (B, 5) int64 (top, left, height, width, seed); height 0: not erased


def attach_erase(images: torch.Tensor, boxes: Optional[torch.Tensor]) -> torch.Tensor:
    """Attach a micro-batch's erase boxes to its images (only boxes that erase something)."""
    if boxes is not None and bool((boxes[:, 2] > 0).any()):
        setattr(images, ERASE_ATTR, boxes)
    return images


def erase_boxes(images: torch.Tensor) -> Optional[torch.Tensor]:
    return getattr(images, ERASE_ATTR, None)


class DeviceFeed:
    """uint8 (B, 3, H, W) -> normalised float32 on `device`, erase boxes filled with their noise.
    A float batch (already normalised: an older caller) passes through unchanged."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = list(mean), list(std)
        self._stats: Dict[torch.device, tuple] = {}

    def _on(self, device: torch.device):
        if device not in self._stats:
            m = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
            s = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
            self._stats[device] = (m.to(device), s.to(device))
        return self._stats[device]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, device=None) -> torch.Tensor:
        boxes = erase_boxes(images)
        x = images.to(device or images.device, non_blocking=True)
        if x.dtype != torch.uint8:
            return x
        m, s = self._on(x.device)
        x = x.float().div_(255.0).sub_(m).div_(s)
        if boxes is not None:
            fill_erased(x, boxes)
        return x


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor (targets, masks) to `device` without a host sync: pinned first when
    the copy goes to a CUDA device (from pageable memory it would wait for the stream's work)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def fill_erased(x: torch.Tensor, boxes: torch.Tensor) -> None:
    """Write each box's N(0,1) noise into x (B, C, H, W) in place: drawn on the CPU from the
    box's seed (the reference's numbers), moved to x's device in one copy."""
    rows = [(i, tuple(int(v) for v in b)) for i, b in enumerate(boxes.tolist()) if b[2] > 0]
    if not rows:
        return
    noises = [erase_noise(box, x.shape[1]) for _, box in rows]
    flat = to_device(torch.cat([n.reshape(-1) for n in noises]), x.device)
    for (i, (top, left, h, w, _)), part in zip(rows, flat.split([n.numel() for n in noises])):
        x[i, :, top:top + h, left:left + w] = part.view(x.shape[1], h, w)


def build_feed(cfg=None) -> DeviceFeed:
    """The feed of a data config (a DataConfig, dict or DictConfig; None: the defaults' mean/std)."""
    from .config import DataConfig, as_data_config

    c = DataConfig() if cfg is None else as_data_config(cfg)
    return DeviceFeed(c.mean, c.std)


def default_device() -> torch.device:
    """The device a batch is fed to when the caller names none: the current CUDA device, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- moving ahead
class ChunkMover:
    """Copies loader chunks to `device` ahead of use: on CUDA on a side stream, `non_blocking`
    (asynchronous when the source is pinned); `ready()` makes the current stream wait for them.
    On the CPU the copies are no-ops and only the order of the work is exercised."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def move(self, t: torch.Tensor) -> torch.Tensor:
        if self.side is None:
            return t.to(self.device, non_blocking=True)
        with torch.cuda.stream(self.side):
            return t.to(self.device, non_blocking=True)

    def ready(self, tensors: Sequence[torch.Tensor]) -> None:
        if self.side is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.side)
        for t in tensors:  # made on the side stream, used on the current one
            t.record_stream(current)


def mover_for(device) -> Optional[ChunkMover]:
    """"auto": a ChunkMover to the current CUDA device when CUDA is available, else none (a CPU
    run feeds the host batch as it is); a device: a mover to it (tests: device=cpu)."""
    if device is None:
        return None
    if device == "auto":
        return ChunkMover(default_device()) if torch.cuda.is_available() else None
    return ChunkMover(device)


# ----------------------------------------------------------------------------- cores
def local_ranks() -> int:
    """Ranks started by one launcher on this node share its CPU affinity (torchrun, deepspeed)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1))


def rank_cores() -> int:
    """This rank's share of the cores it may run on (its affinity: SLURM's or a container's)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // local_ranks())


def auto_workers(cores: Optional[int] = None) -> int:
    """`data.num_workers=auto`: the largest power of two that leaves one of this rank's cores to
    the main process, at least 1. A power of two keeps ranks x workers a divisor of the usual
    power-of-two batches (data.canonical_streams)."""
    budget = max(1, (rank_cores() if cores is None else cores) - 1)
    return 1 << (budget.bit_length() - 1)


_warned = False


def check_worker_cores(num_workers: int, cores: Optional[int] = None) -> Optional[str]:
    """Warn once per process when data workers + the main process exceed this rank's cores;
    returns the warning (None when they fit or it was given already)."""
    global _warned
    cores = rank_cores() if cores is None else cores
    need = max(0, num_workers) + 1
    if need <= cores or _warned:
        return None
    _warned = True
    share = f" ({local_ranks()} ranks share this node's affinity)" if local_ranks() > 1 else ""
    msg = (f"data.num_workers={num_workers} data workers + 1 main process need {need} cores, but this "
           f"rank may run on {cores}{share}: the workers share cores and decode slower. Ask for more "
           f"cores per rank (swinv2-submit cpus_per_task=N, sbatch --cpus-per-task=N) or set "
           f"data.num_workers=auto ({auto_workers(cores)} here) or at most {max(1, cores - 1)}")
    log.warning(msg)
    return msg

"""What a log step says about speed: images/s over the interval since the last log step, elapsed
time and ETA, achieved TFLOP/s per device and MFU (model FLOPs utilisation).

MFU = 3 x 2 x MACs per image x images/s per device / peak FLOP/s of the device. `swinv2.flops`
counts multiply-accumulates (the official formula; tests/test_throughput.py holds it to torch's
FLOP counter), a MAC is 2 FLOPs, and the backward pass costs twice the forward. Activation
recomputation (train.activation_checkpointing) is not counted: it is work the model does not
need, as in torchtitan and nanoGPT. The peak is `train.peak_tflops` or, on a GPU that the one GPU
table (swinv2_train.gpus) knows, its published dense tensor-core number for the run's precision
(fp32 matmuls count at the TF32 rate when torch lets them use it). On a CPU, or a GPU the table does not know, MFU is left out
unless train.peak_tflops is given.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

import swinv2
from .gpus import gpu_entry

def table_peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """The dense peak of a GPU, as CUDA names it, for a precision (bf16 | fp16 | tf32 | fp32), from
    the one GPU table (swinv2_train.gpus); None when the card or that number is not there."""
    return (gpu_entry(device_name) or {}).get(precision)


def matmul_precision(precision: str) -> str:
    """The column of the table for train.precision: fp32 matmuls run at the TF32 rate when torch
    allows TF32 (torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision)."""
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return precision


def peak_tflops(configured: Optional[float], device: torch.device, precision: str) -> Tuple[Optional[float], str]:
    """(peak TFLOP/s per device, where it came from) for MFU: train.peak_tflops wins; then the table,
    on CUDA; else (None, why)."""
    if configured:
        return float(configured), "train.peak_tflops"
    if device.type != "cuda":
        return None, f"no peak for {device.type}: set train.peak_tflops to log MFU"
    name, column = torch.cuda.get_device_name(device), matmul_precision(precision)
    peak = table_peak_tflops(name, column)
    if peak is None:
        return None, f"no dense {column} peak for {name} in swinv2_train.gpus: set train.peak_tflops"
    return peak, f"{name}, dense {column}"


def macs_per_image(model: torch.nn.Module) -> Optional[int]:
    """Forward multiply-accumulates per image of the run's model: swinv2.flops of its backbone,
    plus SimMIM's 1x1-conv pixel decoder (one output of 32^2 x 3 channels per 32-pixel cell).
    None for a model that is not a SwinV2 (no TFLOP/s then)."""
    config = getattr(model, "config", None)
    if not isinstance(config, swinv2.SwinV2Config):
        return None
    macs = swinv2.flops(config)
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        conv = decoder[0]
        cells = (config.img_size // model.encoder_stride) ** 2
        macs += cells * conv.in_channels * conv.out_channels
    return macs


def model_tflops(macs: int, images_per_s: float) -> float:
    """Training TFLOP/s of `images_per_s` images: forward + backward = 3 forwards, a MAC = 2 FLOPs."""
    return 3 * 2 * macs * images_per_s / 1e12


def mfu_pct(macs: int, images_per_s_per_device: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in percent of `peak` TFLOP/s (None without a peak)."""
    if not peak:
        return None
    return 100.0 * model_tflops(macs, images_per_s_per_device) / peak


def format_duration(seconds: float) -> str:
    """h:mm:ss (days spelled out past 24 h)."""
    s = int(max(0.0, seconds) + 0.5)
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{days}d " if days else "") + f"{h}:{m:02d}:{s:02d}"


def device_synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU, where work runs in order."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Meter:
    """Wall time of the steps between two log steps. Device work is queued asynchronously, so the
    interval ends at a log step, after its read of the loss has waited for the device. Time spent
    in evaluations and checkpoint saves between them is left out (`pause`), and counted in the
    run's elapsed time and ETA (the mean time per step of this process, all included)."""

    start_step: int
    t0: float = 0.0
    interval_start: float = 0.0
    interval_steps: int = 0
    wait: float = 0.0
    paused: float = 0.0

    def __post_init__(self):
        self.t0 = self.interval_start = time.perf_counter()

    def add_step(self, wait: float) -> None:
        self.interval_steps += 1
        self.wait += wait

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def lap(self, step: int, total: int) -> Dict[str, float]:
        """The interval's seconds per step, its data-wait fraction, elapsed and ETA (seconds);
        starts the next interval. Call after a host read has waited for the device."""
        now = time.perf_counter()
        busy = max(now - self.interval_start - self.paused, 1e-9)
        done = max(step - self.start_step, 1)
        elapsed = now - self.t0
        out = {"step_time": busy / max(self.interval_steps, 1), "wait_frac": min(1.0, self.wait / busy),
               "elapsed": elapsed, "eta": elapsed / done * max(total - step, 0)}
        self.interval_start, self.interval_steps, self.wait, self.paused = now, 0, 0.0, 0.0
        return out

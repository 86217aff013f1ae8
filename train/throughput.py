"""What a log step says about speed: images/s over the interval since the last log step, elapsed
time and ETA, achieved TFLOP/s per device and MFU (model FLOPs utilisation).

MFU = 3 x 2 x MACs per image x images/s per device / peak FLOP/s of the device. `swinv2.flops`
counts multiply-accumulates (the official formula; tests/test_throughput.py holds it to torch's
FLOP counter), a MAC is 2 FLOPs, and the backward pass costs twice the forward. Activation
recomputation (train.activation_checkpointing) is not counted: it is work the model does not
need, as in torchtitan and nanoGPT. The peak is `train.peak_tflops` or, on a GPU this table knows,
its published dense tensor-core number for the run's precision (fp32 matmuls count at the TF32
rate when torch lets them use it). On a CPU, or a GPU the table does not know, MFU is left out
unless train.peak_tflops is given.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

import swinv2

# Published dense (no sparsity) peak TFLOP/s per GPU: (card, bf16, fp16, tf32, fp32). None: no
# such tensor-core rate. Names are matched as substrings of torch.cuda.get_device_name(), in this
# order (the more specific name first: "H100 NVL" before "H100").
PEAK_TFLOPS: Tuple[Tuple[str, Optional[float], Optional[float], Optional[float], Optional[float]], ...] = (
    ("B200", 2250.0, 2250.0, 1100.0, None),
    ("H200 NVL", 835.0, 835.0, 417.5, 60.0),
    ("H200", 989.0, 989.0, 494.5, 67.0),       # SXM
    ("H100 NVL", 835.0, 835.0, 417.5, 60.0),
    ("H100 PCIe", 756.0, 756.0, 378.0, 51.0),
    ("H100", 989.0, 989.0, 494.5, 67.0),       # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0, 989.0, 494.5, 67.0),
    ("A100", 312.0, 312.0, 156.0, 19.5),       # SXM4 and PCIe, 40 and 80 GB
    ("A800", 312.0, 312.0, 156.0, 19.5),
    ("L40S", 362.0, 362.0, 183.0, 91.6),
    ("L40", 181.0, 181.0, 90.5, 90.5),
    ("L4", 121.0, 121.0, 60.0, 30.3),
    ("A40", 149.7, 149.7, 74.8, 37.4),
    ("A10G", None, None, None, 31.2),          # AWS's A10 variant: no published tensor rates
    ("A10", 125.0, 125.0, 62.5, 31.2),
    ("V100-SXM", None, 125.0, None, 15.7),     # Tesla V100-SXM2-*: no bf16 or tf32
    ("V100", None, 112.0, None, 14.0),         # PCIe
    ("T4", None, 65.0, None, 8.1),
)
_COLUMNS = ("bf16", "fp16", "tf32", "fp32")


def table_peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """The table's dense peak for a device name and a column (bf16 | fp16 | tf32 | fp32); None when
    the card or its number for that precision is not in the table."""
    for row in PEAK_TFLOPS:
        if row[0] in device_name:
            return row[1 + _COLUMNS.index(precision)]
    return None


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
        return None, f"{name} {column} is not in swinv2_train.throughput.PEAK_TFLOPS: set train.peak_tflops"
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

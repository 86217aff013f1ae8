"""Datasheet figures of the GPUs the project knows: dense (no sparsity) peak TFLOP/s per precision
and memory. MFU divides by these peaks; `run.plan=true` uses them when no GPU is detected
(run.plan_gpu); scripts/bench_gpu.py prints the peak beside its measured matmul rate. Standard
library only: bench_gpu.py imports it from a bare checkout too."""
from __future__ import annotations

from typing import Dict, Optional

# name: dense peaks in TFLOP/s (bf16 / fp16 tensor cores, tf32 tensor cores, fp32 without them) and
# memory in GB. Matched against CUDA's device name, longest name first (A100-80GB before A100).
GPUS: Dict[str, Dict[str, Optional[float]]] = {
    "A100-40GB": dict(bf16=312, fp16=312, tf32=156, fp32=19.5, memory_gb=40),
    "A100-80GB": dict(bf16=312, fp16=312, tf32=156, fp32=19.5, memory_gb=80),
    "H100": dict(bf16=989, fp16=989, tf32=495, fp32=67, memory_gb=80),          # SXM
    "H100-PCIE": dict(bf16=756, fp16=756, tf32=378, fp32=51, memory_gb=80),
    "H200": dict(bf16=989, fp16=989, tf32=495, fp32=67, memory_gb=141),
    "L40S": dict(bf16=362, fp16=362, tf32=183, fp32=91.6, memory_gb=48),
    # more cards for MFU (None: no such tensor-core rate, or none published; train.peak_tflops then)
    "H100-NVL": dict(bf16=835, fp16=835, tf32=417.5, fp32=60, memory_gb=94),
    "H200-NVL": dict(bf16=835, fp16=835, tf32=417.5, fp32=60, memory_gb=141),
    "B200": dict(bf16=2250, fp16=2250, tf32=1100, fp32=None, memory_gb=180),
    "L40": dict(bf16=181, fp16=181, tf32=90.5, fp32=90.5, memory_gb=48),
    "L4": dict(bf16=121, fp16=121, tf32=60, fp32=30.3, memory_gb=24),
    "A40": dict(bf16=149.7, fp16=149.7, tf32=74.8, fp32=37.4, memory_gb=48),
    "A10": dict(bf16=125, fp16=125, tf32=62.5, fp32=31.2, memory_gb=24),
    "A10G": dict(bf16=None, fp16=None, tf32=None, fp32=31.2, memory_gb=24),   # AWS's A10 variant
    "V100-SXM2": dict(bf16=None, fp16=125, tf32=None, fp32=15.7, memory_gb=32),  # no bf16 / tf32
    "V100": dict(bf16=None, fp16=112, tf32=None, fp32=14, memory_gb=32),        # PCIe
}


def _matches(key: str, device_name: str) -> bool:
    """'H100-PCIE' matches 'NVIDIA H100 PCIe'; 'A100-80GB' matches 'NVIDIA A100-SXM4-80GB'."""
    name = device_name.upper().replace("-", " ").split()
    return all(part in name for part in key.upper().split("-"))  # whole words: A10 is not A100


def gpu_entry(device_name: str) -> Optional[Dict[str, Optional[float]]]:
    """The table's entry for a GPU as the user or CUDA names it, or None."""
    for key in sorted(GPUS, key=len, reverse=True):
        if _matches(key, device_name):
            return GPUS[key]
    return None


def gpu_key(device_name: str) -> Optional[str]:
    entry = gpu_entry(device_name)
    return next((k for k, v in GPUS.items() if v is entry), None)

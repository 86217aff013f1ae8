"""Datasheet figures of the GPUs the project knows: dense (no sparsity) peak TFLOP/s per precision
and memory. MFU divides by these peaks; `run.plan=true` uses them when no GPU is detected
(run.plan_gpu); scripts/bench_gpu.py prints the peak beside its measured matmul rate. Standard
library only: bench_gpu.py imports it from a bare checkout too."""
from __future__ import annotations

from typing import Dict, Optional

# name: dense peaks in TFLOP/s (bf16 / fp16 tensor cores, tf32 tensor cores, fp32 without them) and
# memory in GB. Matched against CUDA's device name, longest name first (A100-80GB before A100).
GPUS: Dict[str, Dict[str, float]] = {
    "A100-40GB": dict(bf16=312, fp16=312, tf32=156, fp32=19.5, memory_gb=40),
    "A100-80GB": dict(bf16=312, fp16=312, tf32=156, fp32=19.5, memory_gb=80),
    "H100": dict(bf16=989, fp16=989, tf32=495, fp32=67, memory_gb=80),          # SXM
    "H100-PCIE": dict(bf16=756, fp16=756, tf32=378, fp32=51, memory_gb=80),
    "H200": dict(bf16=989, fp16=989, tf32=495, fp32=67, memory_gb=141),
    "L40S": dict(bf16=362, fp16=362, tf32=183, fp32=91.6, memory_gb=48),
}


def _matches(key: str, device_name: str) -> bool:
    """'H100-PCIE' matches 'NVIDIA H100 PCIe'; 'A100-80GB' matches 'NVIDIA A100-SXM4-80GB'."""
    name = device_name.upper().replace("-", " ").split()
    return all(part in name or any(w.startswith(part) for w in name) for part in key.upper().split("-"))


def gpu_entry(device_name: str) -> Optional[Dict[str, float]]:
    """The table's entry for a GPU as the user or CUDA names it, or None."""
    for key in sorted(GPUS, key=len, reverse=True):
        if _matches(key, device_name):
            return GPUS[key]
    return None


def gpu_key(device_name: str) -> Optional[str]:
    entry = gpu_entry(device_name)
    return next((k for k, v in GPUS.items() if v is entry), None)

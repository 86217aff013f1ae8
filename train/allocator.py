"""The CPU allocator policy of a training run (`train.cpu_malloc`): keep RSS at live memory.

PyTorch takes every CPU tensor from glibc with ``posix_memalign``; glibc never reuses the hole a
freed aligned block leaves in its heap, and once its dynamic mmap threshold has risen (to the size
of a freed mmap'ed block, up to 32 MB) mid-sized tensors come from that heap, so RSS grows far past
live memory (docs/PERFORMANCE.md, scripts/malloc_holes.py). Fixing the mmap threshold at 1 MiB
makes every tensor >= 1 MiB its own mapping, returned to the OS on free. ``mallopt`` does at run
time what ``MALLOC_MMAP_THRESHOLD_=1048576`` does at process start (it also turns the dynamic
threshold off), so the trainer can set it for the user.

Policies: ``on`` sets it on glibc unless jemalloc or tcmalloc is preloaded (they do not keep such
holes) or ``MALLOC_MMAP_THRESHOLD_`` is already in the environment (the user's choice); ``auto``
(default) does the same for inputs of at least AUTO_MIN_IMG_SIZE pixels a side and leaves glibc
alone below: every tensor >= 1 MiB then page-faults afresh on first touch, which made a 256^2/W8
batch-8 step 1.5x (fp32) to 1.9x (bf16) slower, while the retained holes only matter at high
resolution (at 1536^2 they are 1.9 GB of a 2.3 GB heap with 0.6 GB live). ``off`` leaves the
allocator alone. The trainer applies it on CPU only, before the model is built, and logs the one
line `apply_cpu_malloc_policy` returns. The model library never touches it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from typing import Optional

log = logging.getLogger(__name__)

CPU_MALLOC_POLICIES = ("auto", "on", "off")
AUTO_MIN_IMG_SIZE = 1024  # auto: from here on the memory the threshold saves is worth its page faults
MMAP_THRESHOLD_BYTES = 1 << 20  # 1 MiB: the setting measured in docs/PERFORMANCE.md
M_MMAP_THRESHOLD = -3           # glibc <malloc.h>
ALTERNATIVE_ALLOCATORS = ("jemalloc", "tcmalloc")


def preloaded_allocator(maps_path: str = "/proc/self/maps") -> Optional[str]:
    """"jemalloc" or "tcmalloc" when that library is mapped into this process (LD_PRELOAD or
    linked in), else None."""
    names = os.environ.get("LD_PRELOAD", "")
    try:
        with open(maps_path) as f:
            names += f.read()
    except OSError:  # no procfs: LD_PRELOAD alone
        pass
    return next((a for a in ALTERNATIVE_ALLOCATORS if f"lib{a}" in names), None)


def set_glibc_mmap_threshold(nbytes: int) -> bool:
    """mallopt(M_MMAP_THRESHOLD, nbytes); True when glibc accepted it (False: not glibc)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1


def apply_cpu_malloc_policy(policy: str, img_size: int) -> str:
    """Apply `train.cpu_malloc` to this process for a model of `img_size` inputs; returns (and logs)
    what was done, in one line."""
    if policy not in CPU_MALLOC_POLICIES:
        raise ValueError(f"train.cpu_malloc: {policy!r} is not one of {CPU_MALLOC_POLICIES}")
    msg = _apply(policy, img_size)
    log.info("CPU allocator: %s", msg)
    return msg


def _apply(policy: str, img_size: int) -> str:
    if policy == "off":
        return "left as is (train.cpu_malloc=off)"
    if policy == "auto" and img_size < AUTO_MIN_IMG_SIZE:
        return (f"glibc's default kept for {img_size}^2 inputs (train.cpu_malloc=auto fixes the mmap threshold "
                f"from {AUTO_MIN_IMG_SIZE}^2, where the memory it saves is worth its page faults; "
                "train.cpu_malloc=on to fix it anyway)")
    alternative = preloaded_allocator()
    if alternative:
        return f"{alternative} is preloaded: nothing set (it keeps RSS near live memory itself)"
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return (f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} from the environment: "
                "nothing set")
    if not set_glibc_mmap_threshold(MMAP_THRESHOLD_BYTES):
        return "not glibc (or mallopt refused): nothing set"
    return (f"glibc mmap threshold fixed at {MMAP_THRESHOLD_BYTES >> 20} MiB (mallopt M_MMAP_THRESHOLD): freed "
            "tensors >= 1 MiB go back to the OS, so RSS tracks live memory; train.cpu_malloc=off to keep "
            "glibc's dynamic threshold")

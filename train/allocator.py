"""The CPU allocator policy of a training run (`train.cpu_malloc`): RSS at live memory at high
resolution, steps without page faults below.

PyTorch takes every CPU tensor from glibc with ``posix_memalign``; glibc never reuses the hole a
freed aligned block leaves in its heap, and once its dynamic mmap threshold has risen (to the size
of a freed mmap'ed block, up to 32 MB) mid-sized tensors come from that heap, so RSS grows far past
live memory (docs/PERFORMANCE.md, scripts/malloc_holes.py). Fixing the mmap threshold at 1 MiB
makes every tensor >= 1 MiB its own mapping, returned to the OS on free. ``mallopt`` does at run
time what ``MALLOC_MMAP_THRESHOLD_=1048576`` does at process start (it also turns the dynamic
threshold off), so the trainer can set it for the user.

Policies:
* ``on``: the 1 MiB threshold (RSS at live memory); every tensor >= 1 MiB then page-faults afresh
  on first touch.
* ``retain``: the opposite, fixed thresholds that keep freed blocks up to 512 MiB in the heap
  (``M_MMAP_THRESHOLD`` 512 MiB, ``M_TRIM_THRESHOLD`` 1 GiB): a step reuses the memory of the last
  one without a page fault, and RSS stays at the run's peak. glibc's default is neither: its
  dynamic thresholds stop at 32 MB / 64 MB, so a 256^2/W8 batch-8 step still unmaps and re-faults
  ~50 k (bf16) to ~100 k (fp32) pages; ``retain`` made it 10% (bf16) / 6% (fp32) faster, 512^2 steps
  20-24% faster, with the same peak RSS as the default within 9% (docs/PERFORMANCE.md). Older glibc
  (2.33 and before) caps the mmap threshold at 32 MiB; there blocks up to 32 MiB are kept (the log line
  says which).
* ``auto`` (default): ``on`` for inputs of at least AUTO_MIN_IMG_SIZE pixels a side, where the retained
  holes are most of the heap (1.9 GB of a 2.3 GB heap with 0.6 GB live at 1536^2), ``retain`` below.
* ``off`` leaves the allocator alone.
Nothing is set when jemalloc or tcmalloc is preloaded (they do not keep such holes) or a
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` is in the environment (the user's choice). The
trainer applies it on CPU only, before the model is built, and logs the one line
`apply_cpu_malloc_policy` returns. The model library never touches it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from typing import Optional

log = logging.getLogger(__name__)

CPU_MALLOC_POLICIES = ("auto", "on", "retain", "off")
AUTO_MIN_IMG_SIZE = 1024  # auto: `on` from here on, where the memory it saves is worth its page faults
MMAP_THRESHOLD_BYTES = 1 << 20  # on: 1 MiB, the setting measured in docs/PERFORMANCE.md
RETAIN_THRESHOLDS = (512 << 20, 1 << 30)  # retain: (mmap, trim); trim at twice mmap, glibc's own ratio
# older glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2, 32 MiB on 64-bit (2.33 and before, e.g.
# RHEL 8, Ubuntu 20.04; 2.36 takes 512 MiB): `retain` then falls back to 32 MiB, which still keeps every
# tensor up to 32 MiB in the heap
OLD_GLIBC_MAX_MMAP_THRESHOLD = 32 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
ALTERNATIVE_ALLOCATORS = ("jemalloc", "tcmalloc")
USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


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


def set_glibc_thresholds(mmap_bytes: int, trim_bytes: Optional[int] = None) -> bool:
    """mallopt(M_MMAP_THRESHOLD, mmap_bytes) and, if given, mallopt(M_TRIM_THRESHOLD, trim_bytes) (either
    turns glibc's dynamic thresholds off); True when glibc accepted them. False when this is not glibc or
    glibc refused the mmap threshold (then nothing is set: the trim threshold comes second, and glibc
    accepts any trim threshold)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = libc.mallopt(M_MMAP_THRESHOLD, int(mmap_bytes)) == 1
    return ok and (trim_bytes is None or libc.mallopt(M_TRIM_THRESHOLD, int(trim_bytes)) == 1)


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
    chosen = policy
    if policy == "auto":
        chosen = "on" if img_size >= AUTO_MIN_IMG_SIZE else "retain"
    alternative = preloaded_allocator()
    if alternative:
        return f"{alternative} is preloaded: nothing set (it keeps RSS near live memory itself)"
    user = [f"{k}={os.environ[k]}" for k in USER_ENV if os.environ.get(k)]
    if user:
        return f"{', '.join(user)} from the environment: nothing set"
    why = f" (train.cpu_malloc=auto at {img_size}^2)" if policy == "auto" else ""
    refused = "not glibc (or mallopt refused): nothing set"
    if chosen == "on":
        if not set_glibc_thresholds(MMAP_THRESHOLD_BYTES):
            return refused
        return (f"glibc mmap threshold fixed at {MMAP_THRESHOLD_BYTES >> 20} MiB{why}: freed tensors >= 1 MiB "
                "go back to the OS, so RSS tracks live memory; train.cpu_malloc=retain for fewer page faults, "
                "train.cpu_malloc=off for glibc's dynamic thresholds")
    mmap_bytes, trim_bytes = RETAIN_THRESHOLDS
    if not set_glibc_thresholds(mmap_bytes, trim_bytes):
        mmap_bytes = OLD_GLIBC_MAX_MMAP_THRESHOLD  # mallopt refused the mmap threshold and set nothing
        if not set_glibc_thresholds(mmap_bytes, trim_bytes):
            return refused
    return (f"glibc keeps freed blocks up to {mmap_bytes >> 20} MiB in its heap{why} (mmap threshold "
            f"{mmap_bytes >> 20} MiB, trim threshold {trim_bytes >> 30} GiB): steps reuse memory without page "
            "faults and RSS stays at the run's peak; train.cpu_malloc=on for RSS at live memory, "
            "train.cpu_malloc=off for glibc's dynamic thresholds")

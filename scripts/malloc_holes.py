#!/usr/bin/env python
"""Why peak RSS on CPU exceeds live tensor memory: glibc never reuses the hole of a freed aligned block.

PyTorch's CPU allocator asks glibc for every tensor with ``posix_memalign(64, n)``. glibc carves such a
request as n + alignment + a header from its heap, so the hole left by a freed n-byte tensor is too
small for the next n-byte tensor unless a neighbour is free too. Once glibc's dynamic mmap threshold
has risen (it follows the largest freed mmap'ed block, up to 32 MB), mid-sized tensors come from the
heap and the heap keeps growing around those holes. This script replays the pattern of a training
step (two same-sized temporaries, one freed, a small allocation kept alive between them) with plain
``malloc`` and with ``posix_memalign`` and prints glibc's heap statistics (``mallinfo2``).

    python scripts/malloc_holes.py            # 28 MB blocks (a stage-2 tensor of tiny 1536^2)
    python scripts/malloc_holes.py --json     # machine-readable

Run a process with ``MALLOC_MMAP_THRESHOLD_=1048576`` (every block >= 1 MiB mmap'ed and unmapped on
free) and the heap no longer grows: see docs/PERFORMANCE.md ("Current figures", table C).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import platform
import subprocess
import sys


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _libc():
    if platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):  # glibc < 2.33
        return None
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
    return libc


KINDS = ("malloc", "posix_memalign")


def replay(libc, aligned: bool, nbytes: int, steps: int) -> list[dict[str, float]]:
    """Per step: glibc heap size, bytes in use and bytes free in the heap (MB). Everything is freed at the end."""
    def alloc(n: int) -> int:
        if not aligned:
            return libc.malloc(n)
        p = ctypes.c_void_p()
        if libc.posix_memalign(ctypes.byref(p), 64, n) != 0:
            raise MemoryError(n)
        return p.value

    libc.free(alloc(nbytes))  # an mmap'ed block freed: raises the dynamic mmap threshold to nbytes
    live, rows = [], []
    for _ in range(steps):
        a, b = alloc(nbytes), alloc(nbytes)
        live.append(alloc(4096))  # small and long-lived, like a saved tensor's metadata or a norm
        libc.free(a)
        live.append(b)
        mi = libc.mallinfo2()
        rows.append(dict(heap_mb=mi.arena / 1e6, in_use_mb=mi.uordblks / 1e6, free_mb=mi.fordblks / 1e6))
    for p in live:
        libc.free(p)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=28.31, help="block size in MB (default: 28.31)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)  # one replay in this process (child)
    args = ap.parse_args(argv)
    libc = _libc()
    if libc is None:
        print("malloc_holes.py needs glibc >= 2.33 (mallinfo2); nothing measured", file=sys.stderr)
        return 2
    if args.kind:
        print(json.dumps(replay(libc, args.kind == "posix_memalign", int(args.mb * 1e6), args.steps)))
        return 0
    result = {}
    for kind in KINDS:  # each in a fresh process: the same starting heap
        out = subprocess.run([sys.executable, __file__, "--kind", kind, "--mb", str(args.mb), "--steps",
                              str(args.steps)], capture_output=True, text=True, check=True).stdout
        result[kind] = json.loads(out)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"glibc {platform.libc_ver()[1]}; {args.mb} MB blocks; per step: heap / in use / free (MB)")
    for kind, rows in result.items():
        print(f"{kind:15s} " + "  ".join(f"{r['heap_mb']:.0f}/{r['in_use_mb']:.0f}/{r['free_mb']:.0f}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

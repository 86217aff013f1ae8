"""A live-tensor-memory tracker for measurements and tests: every tensor storage created by an op
while active, its size, and when it died (a TorchDispatchMode; no allocator statistics needed, so
it works on the CPU). Used by scripts/memory_model.py and by the memory tests."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch._library.custom_ops import OPDEFS  # private, but the only registry of Python custom ops
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _python_custom_op(func):
    """The Python function behind a ``torch.library.custom_op`` (the chunked attention kernels), or
    None. A dispatch mode sees such an op as one call; its chunk temporaries live inside it."""
    opdef = OPDEFS.get(func._schema.name) if isinstance(func, torch._ops.OpOverload) else None
    return None if opdef is None else opdef._init_fn


class SeeThroughMode(TorchDispatchMode):
    """A dispatch mode that also sees the ops inside Python custom ops: a subclass's
    ``__torch_dispatch__`` calls ``self.call(func, args, kwargs)`` instead of ``func(...)``."""

    def call(self, func, args=(), kwargs=None):
        impl = _python_custom_op(func)
        if impl is None:
            return func(*args, **(kwargs or {}))
        with self:  # the mode is off while it handles an op: back on for the op's own ops
            return impl(*args, **(kwargs or {}))


class LiveMemoryTracker(SeeThroughMode):
    """Tracks every tensor storage created by an op while active: its size and when it died.

    ``peak`` is the largest sum of live tracked bytes seen after any op; ``largest`` the largest
    single storage; ``timeline()`` lets callers recompute a peak that excludes some storages
    (e.g. parameter gradients). Storages that existed before (parameters, inputs) are ignored.
    """

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.live: dict[int, tuple[StorageWeakRef, int, int]] = {}  # data_ptr -> (ref, nbytes, record id)
        self.records: list[list[Any]] = []  # [ptr, nbytes, born, died, shape]
        self.cur = self.peak = self.largest = 0
        self.largest_shape: tuple[int, ...] = ()
        self.known: set[int] = set()

    def ignore_existing(self, tensors: Iterable[torch.Tensor]) -> "LiveMemoryTracker":
        for t in tensors:
            if t is not None and t.device.type != "meta":
                self.known.add(t.untyped_storage().data_ptr())
        return self

    def _sweep(self) -> None:
        dead = [p for p, (ref, _, _) in self.live.items() if ref.expired()]
        for p in dead:
            _, nb, rid = self.live.pop(p)
            self.cur -= nb
            self.records[rid][3] = self.step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = self.call(func, args, kwargs)
        self.step += 1
        self._sweep()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr == 0 or ptr in self.live or ptr in self.known:
                continue
            nb = st.nbytes()
            self.live[ptr] = (StorageWeakRef(st), nb, len(self.records))
            self.records.append([ptr, nb, self.step, math.inf, tuple(t.shape)])
            self.cur += nb
            if nb > self.largest:
                self.largest, self.largest_shape = nb, tuple(t.shape)
        self.peak = max(self.peak, self.cur)
        return out

    def live_bytes(self) -> int:
        self._sweep()
        return self.cur

    def peak_where(self, pred, start: int = 0, end: float = math.inf) -> int:
        """Peak over op steps in [start, end) of the live bytes of storages whose shape satisfies pred."""
        self._sweep()
        events: list[tuple[float, int]] = []
        for _, nb, born, died, shape in self.records:
            if not pred(shape) or died <= start or born >= end:
                continue
            events.append((max(born, start), nb))
            if died != math.inf:
                events.append((died - 0.5, -nb))
        cur = peak = 0
        for _, d in sorted(events):
            cur += d
            peak = max(peak, cur)
        return peak

    def peak_excluding(self, ptrs_alive_at_end: set[int]) -> int:
        """Peak of live bytes over time, leaving out storages still alive at the end at these addresses."""
        self._sweep()
        events: list[tuple[float, int]] = []
        for ptr, nb, born, died, _ in self.records:
            if died == math.inf and ptr in ptrs_alive_at_end:
                continue
            events.append((born, nb))
            if died != math.inf:
                events.append((died - 0.5, -nb))  # freed before the allocations of step `died`
        cur = peak = 0
        for _, d in sorted(events):
            cur += d
            peak = max(peak, cur)
        return peak

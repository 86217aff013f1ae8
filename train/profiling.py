"""Profiler traces and memory snapshots on demand (train.profile_steps, train.oom_snapshot).

`train.profile_steps=[a,b]` records optimizer steps a..b (1-based, inclusive) with torch.profiler
(CPU activities, and CUDA's on a GPU) and writes the trace to RUN_DIR/profile/ as Chrome/Perfetto
JSON named *.pt.trace.json, which chrome://tracing, ui.perfetto.dev and TensorBoard's profiler
plugin (`tensorboard --logdir RUN_DIR/profile`) read. On CUDA the same steps also record the
allocator's history and dump a memory snapshot (torch.cuda.memory._dump_snapshot; drop the
.pickle on pytorch.org/memory_viz). `train.oom_snapshot=true` (CUDA) records that history for the
whole run and dumps a snapshot when a step runs out of memory, before the error goes on.
Every rank writes its own files (rank{r}_...); file names: swinv2_train.rundir.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional, Sequence

import torch

from .rundir import RunDir

log = logging.getLogger("train")

MEMORY_HISTORY_ENTRIES = 100_000  # allocation events kept (the newest): enough for a few large steps


class StepProfiler:
    """Started before step `first`, stopped after step `last`; a no-op without profile steps."""

    def __init__(self, run_dir: str, steps: Sequence[int], device: torch.device, rank: int = 0,
                 oom_snapshot: bool = False):
        self.run, self.device, self.rank = RunDir(run_dir), device, rank
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.cuda = device.type == "cuda"
        self.oom_snapshot = oom_snapshot and self.cuda
        self._prof: Optional[torch.profiler.profile] = None
        if oom_snapshot and not self.cuda and rank == 0:
            log.warning("train.oom_snapshot: memory snapshots need CUDA; nothing is recorded on %s", device.type)
        if self.oom_snapshot:
            self._record_memory(True)

    def _record_memory(self, on: bool) -> None:
        if on:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        elif not self.oom_snapshot:  # the OOM watch keeps recording
            torch.cuda.memory._record_memory_history(enabled=None)

    def before_step(self, step: int) -> None:
        """Call with the number of the step about to run."""
        if step != self.first:
            return
        os.makedirs(self.run.profile, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._record_memory(True)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self._prof.__enter__()

    def after_step(self, step: int) -> Optional[str]:
        """Call with the number of the step that just ran; the trace's path when it was written."""
        if self._prof is None or step != self.last:
            return None
        return self._write(step)

    def finish(self, step: int) -> Optional[str]:
        """The run stops (its budget, a preemption) at `step` while tracing: the steps so far."""
        return self._write(step) if self._prof is not None else None

    def _write(self, last: int) -> str:
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the steps' kernels belong in the trace
        self._prof.__exit__(None, None, None)
        path = self.run.profile_trace(self.rank, self.first, last)
        self._prof.export_chrome_trace(path)
        self._prof = None
        if self.cuda:
            self.dump_memory(f"steps_{self.first}-{last}")
            self._record_memory(False)
        if self.rank == 0:
            log.info("train.profile_steps: steps %d-%d traced to %s (tensorboard --logdir %s)", self.first, last,
                     path, self.run.profile)
        return path

    def dump_memory(self, what: str) -> str:
        path = self.run.memory_snapshot(self.rank, what)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.cuda.memory._dump_snapshot(path)
        return path

    @contextlib.contextmanager
    def oom_guard(self, step: int) -> Iterator[None]:
        """With train.oom_snapshot on CUDA: a step that runs out of memory dumps a snapshot first."""
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            if self.oom_snapshot:
                path = self.dump_memory(f"oom_step_{step}")
                log.error("step %d ran out of GPU memory; memory snapshot: %s (pytorch.org/memory_viz)", step, path)
            raise

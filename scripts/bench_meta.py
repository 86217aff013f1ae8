"""What every benchmark of scripts/ records beside its numbers: when, on what machine, with what software.

``bench_metadata(__file__, argv)`` is the ``meta`` of each results JSON (bench.py, bench_gpu.py,
bench_compile.py, bench_checkpointing.py, bench_loader.py, memory_model.py) and ``summary_line(meta)``
the one-line header each prints. Standard library and torch only: bench_gpu.py imports this module
from a bare checkout too (a GPU node where only torch is installed).
"""
from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

NOT_IMPORTABLE = "not importable"  # the start of a package's entry when it cannot be imported here


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else lscpu), else platform.processor() or the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:  # ARM Linux: no "model name" in /proc/cpuinfo, lscpu knows it
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity: a SLURM or container limit), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                          timeout=10)


def git_commit() -> Optional[str]:
    """HEAD of the git checkout holding this file; None outside one (an installed wheel) or without git."""
    try:
        r = _git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def git_dirty() -> Optional[bool]:
    """Whether tracked files of that checkout differ from HEAD (the numbers are not HEAD's alone); None
    where git_commit() is None."""
    try:
        r = _git("diff", "--quiet", "HEAD", "--")
    except (OSError, subprocess.SubprocessError):
        return None
    return {0: False, 1: True}.get(r.returncode)


def package_version(name: str) -> str:
    """`name.__version__`, or "not importable: <error>" (recorded, not fatal)."""
    try:
        return str(importlib.import_module(name).__version__)
    except Exception as e:  # an absent or broken optional package is part of the record
        return f"{NOT_IMPORTABLE}: {type(e).__name__}: {e}"


def bench_metadata(script: str, argv: Optional[Sequence[str]] = None, *, packages: Sequence[str] = (),
                   **extra: Any) -> dict[str, Any]:
    """The metadata of one benchmark run, taken now.

    script: the benchmark's ``__file__`` (the command is recorded as ``scripts/<its name> <argv>``);
    argv: its arguments (default ``sys.argv[1:]``); packages: more packages whose versions matter (the
    HF peer's ``transformers``, ``PIL``); extra: the run's own settings, added as given.

    Fields: date (UTC, ISO), command, host, machine (e.g. x86_64), platform, python, torch, cpu_model,
    cores (usable by this process), threads (torch's intra-op threads), loadavg (1/5/15 min, now),
    git_commit and git_dirty of the checkout; on a CUDA machine gpu, gpu_mem_gb and cuda; then one
    entry per package; then extra.
    """
    import torch

    args = list(sys.argv[1:] if argv is None else argv)
    meta: dict[str, Any] = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["scripts/" + Path(script).name, *args]),
        host=platform.node(), machine=platform.machine(), platform=platform.platform(),
        python=platform.python_version(), torch=torch.__version__,
        cpu_model=cpu_model(), cores=usable_cores(), threads=torch.get_num_threads(),
        loadavg=list(os.getloadavg()), git_commit=git_commit(), git_dirty=git_dirty(),
    )
    if torch.cuda.is_available():
        meta.update(gpu=torch.cuda.get_device_name(0),
                    gpu_mem_gb=torch.cuda.get_device_properties(0).total_memory / 1e9, cuda=torch.version.cuda)
    for name in packages:
        meta[name] = package_version(name)
    meta.update(extra)
    return meta


def summary_line(meta: dict[str, Any]) -> str:
    """One line for a benchmark's printed output: date, hardware, threads, torch, load."""
    hw = f"{meta['gpu']} ({meta['gpu_mem_gb']:.0f} GB), " if "gpu" in meta else ""
    return (f"{meta['date']}  {hw}{meta['cpu_model']}  {meta['cores']} cores, {meta['threads']} threads  "
            f"torch {meta['torch']}  load {meta['loadavg'][0]:.2f}")

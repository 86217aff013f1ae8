"""The trainer's one collectives module: rank discovery, process-group setup, barriers and
reductions. Nothing else in train/ reads RANK/WORLD_SIZE/SLURM_* or calls torch.distributed.

* :func:`launch_ranks` (rank, world size, local rank) from the launcher's variables, before any
  process group (config checks and error printing need them that early);
* :func:`barrier`, :func:`all_reduce_sum`, :func:`all_reduce_max`, :func:`all_reduce_max_list`,
  :func:`sum_counts`, :func:`broadcast_object`: no-ops (the local value) without a process group.

One entry point, :func:`init_distributed`, works under

* a plain ``python train/main.py`` (single process, loopback rendezvous),
* ``torchrun`` (exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* plus TORCHELASTIC_RUN_ID),
* the ``deepspeed`` launcher (same variables plus CROSS_RANK/CROSS_SIZE/LOCAL_SIZE, and it
  appends ``--local_rank=N`` to argv, see :func:`strip_launcher_args`),
* a SLURM ``srun`` task (only SLURM_* variables; also what ``deepspeed --launcher slurm``
  produces), which is mapped onto the torch ``env://`` variables here.

The process group is always initialised, even for one process, because
``deepspeed.initialize`` requires it.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "SWINV2_DIST_TIMEOUT"
LAUNCHERS = ("single", "torchrun", "deepspeed", "slurm")

_LOCAL_RANK_RE = re.compile(r"^--local[-_]rank(?:=(.*))?$")


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N`` / ``--local-rank=N`` from ``argv``.

    The deepspeed launcher (and the old ``torch.distributed.launch``) appends it, and Hydra
    rejects it as an override. The value is moved to ``LOCAL_RANK`` when that is not set yet, so
    nothing is lost. Returns a new list; ``argv[0]`` is kept.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        m = _LOCAL_RANK_RE.match(arg) if i > 0 else None
        if m is None:
            out.append(arg)
            i += 1
            continue
        value = m.group(1)
        if value is None and i + 1 < len(argv) and re.fullmatch(r"-?\d+", argv[i + 1]):
            value = argv[i + 1]
            i += 1
        if value is not None and value.strip():
            os.environ.setdefault("LOCAL_RANK", value.strip())
        i += 1
    return out


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV: Optional[DistEnv] = None


def get_env() -> Optional[DistEnv]:
    """The :class:`DistEnv` of the last :func:`init_distributed` call (None before it)."""
    return _ENV


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def slurm_port(job_id: str | int) -> int:
    """Rendezvous port derived from the job id: the same on every task of a job (and of its
    requeued incarnations) without any communication, and different for concurrent jobs."""
    return 20000 + int(job_id) % 20000


def _expand_first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist such as ``gpu[003-005,009],cpu1`` without scontrol."""
    nodelist = nodelist.strip()
    depth, first = 0, nodelist
    for i, ch in enumerate(nodelist):  # split at the first top-level comma
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            first = nodelist[:i]
            break
    m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    lo = ranges.split(",")[0].split("-")[0]  # keeps zero padding, e.g. "003"
    return f"{prefix}{lo}{suffix}"


def slurm_master_addr(nodelist: str) -> str:
    """First host of the allocation: ``scontrol show hostnames`` is authoritative (it knows
    every hostlist syntax); the parser is a fallback for nodes without the client tools."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=15, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return _expand_first_host(nodelist)


def _is_srun_task(environ=os.environ) -> bool:
    """Inside a SLURM job *step* (an srun task). The batch shell also has SLURM_PROCID=0 and
    SLURM_NTASKS=N, but a python started there directly is one process, and treating it as rank 0
    of N would hang."""
    return "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ


def launch_ranks(environ=os.environ) -> tuple[int, int, int]:
    """(rank, world size, local rank) as the launcher set them, before any process group exists:
    torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK), an srun task (SLURM_PROCID,
    SLURM_STEP_NUM_TASKS or SLURM_NTASKS, SLURM_LOCALID), else one process (0, 1, 0).
    The one place that reads them (config checks, error printing and init_distributed use it)."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return (int(environ.get("RANK", "0")), int(environ.get("WORLD_SIZE", "1")),
                int(environ.get("LOCAL_RANK", "0")))
    if _is_srun_task(environ):
        ntasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS", "1")
        return int(environ["SLURM_PROCID"]), int(ntasks), int(environ.get("SLURM_LOCALID", "0"))
    return 0, 1, int(environ.get("LOCAL_RANK", "0"))


def launch_rank() -> int:
    return launch_ranks()[0]


def launch_world_size() -> int:
    return launch_ranks()[1]


def _map_slurm_env() -> bool:
    """Export torch ``env://`` variables from an ``srun`` task's SLURM variables (see
    :func:`_is_srun_task`: only inside a job step)."""
    if not _is_srun_task():
        return False
    rank, world_size, local_rank = launch_ranks()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
        os.environ["MASTER_ADDR"] = slurm_master_addr(nodelist) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(slurm_port(os.environ.get("SLURM_JOB_ID", "0")))
    return True


def _detect_launcher(mapped_from_slurm: bool, world_size: int) -> str:
    if mapped_from_slurm:
        return "slurm"
    if "TORCHELASTIC_RUN_ID" in os.environ or "GROUP_RANK" in os.environ:
        return "torchrun"
    # deepspeed/launcher/launch.py exports these next to RANK; torchrun does not.
    if "CROSS_RANK" in os.environ or "LOCAL_SIZE" in os.environ:
        return "deepspeed"
    # RANK set by something else (a hand-written env:// launch) behaves like torchrun.
    return "single" if world_size == 1 else "torchrun"


def _timeout_s(timeout_s: Optional[float]) -> float:
    if timeout_s is not None:
        return float(timeout_s)
    env = os.environ.get(TIMEOUT_ENV)
    return float(env) if env else DEFAULT_TIMEOUT_S


def bound_later_groups(timeout: timedelta) -> None:
    """Give process groups created later the same collective timeout as the world group. torch's
    new_group() without a timeout takes its module default (30 min), not the world's, and ZeRO
    reduces gradients in a data-parallel group DeepSpeed creates that way: a silent peer would
    hang that all-reduce for half an hour instead of `train.dist_timeout_s` (tests/test_multinode.py,
    a frozen node)."""
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timeout


def init_distributed(timeout_s: Optional[float] = None) -> DistEnv:
    """Discover rank/world size, initialise torch.distributed through DeepSpeed, return a
    :class:`DistEnv`. Idempotent: a second call returns the first result.

    ``timeout_s`` bounds rendezvous and every collective (default ``$SWINV2_DIST_TIMEOUT`` or
    600 s), so a dead peer turns into an error instead of a hang.
    """
    global _ENV
    if _ENV is not None and dist.is_initialized():
        return _ENV
    # DeepSpeed's ZeRO gathers call this torch name, which warns at every optimizer step of every
    # rank; nothing a user can change, so not worth a line per step
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

    mapped = False
    if "RANK" not in os.environ:
        mapped = _map_slurm_env()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    rank, world_size, local_rank = launch_ranks()
    if world_size == 1:
        # Loopback only: a single process never needs another host.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"RANK={rank} WORLD_SIZE={world_size} but {missing} not set; "
                           "start with torchrun, the deepspeed launcher or srun")

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        # Must precede the first deepspeed import, which resolves the accelerator once.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"

    # DeepSpeed probes the C compiler for its optional ops on import; setuptools logs each probe's
    # gcc command at INFO. Failures still surface as warnings or exceptions.
    logging.getLogger("compilers").setLevel(logging.WARNING)
    import deepspeed  # late: after DS_ACCELERATOR is set

    if not use_cuda and local_rank == 0:
        announce_cpu_op_build()
    timeout = timedelta(seconds=_timeout_s(timeout_s))
    chatter = io.StringIO()  # "DeepSpeed ... built successfully", printed on every start
    with contextlib.redirect_stdout(chatter):
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
                                   verbose=False)
    if chatter.getvalue().strip():
        log.debug("deepspeed.init_distributed: %s", chatter.getvalue().strip())
    bound_later_groups(timeout)
    launcher = _detect_launcher(mapped, world_size)
    _ENV = DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                   backend=backend, launcher=launcher)
    log.info("distributed: %s", _ENV)
    # Every rank says where it runs (ranks > 0 log warnings only, hence stderr): what a
    # multi-node launch has to get right, visible in each rank's output.
    print(f"rank {rank}/{world_size} on {socket.gethostname()} (node {_node_index()}, "
          f"local rank {local_rank})", file=sys.stderr, flush=True)
    return _ENV


def _node_index() -> int:
    """This process's node as its launcher numbered it: torchrun's GROUP_RANK, the deepspeed
    launcher's CROSS_RANK, an srun task's SLURM_NODEID; 0 without any of them."""
    for var in ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def cpu_op_to_build() -> Optional[tuple[str, str]]:
    """(op name, build dir) when deepspeed.init_distributed is about to JIT-compile the CPU
    shared-memory collectives op (the first start per machine and torch build, ~30 s), else None.
    torch's cpp_extension builds op NAME in $TORCH_EXTENSIONS_DIR/NAME (default
    ~/.cache/torch_extensions/py3X_cpu/NAME) and reuses NAME.so found there."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if (builder is None or installed_ops.get(builder.NAME, False)
                or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False)):
            return None  # pre-built into the wheel, or not used on this platform
        build_dir = _get_build_directory(builder.NAME, verbose=False)
    except Exception:  # noqa: BLE001 - only a notice depends on this guess
        return None
    if os.path.exists(os.path.join(build_dir, f"{builder.NAME}.so")):
        return None
    return builder.NAME, build_dir


def announce_cpu_op_build() -> None:
    """One line before the silent first-time compile, so the wait is not mistaken for a hang."""
    op = cpu_op_to_build()
    if op is not None:
        log.info("building DeepSpeed's %s CPU op once into %s (~30 s; later starts reuse it)", *op)


def _device() -> torch.device:
    if _ENV is not None:
        return _ENV.device
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _live() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _live():
        dist.barrier()


def _all_reduce(values: Sequence[float], op) -> list[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    if _live():
        dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over all ranks (the values themselves without a process group)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(value: float | bool) -> float:
    """Max of ``value`` over all ranks (plain ``float(value)`` without a process group)."""
    return _all_reduce([value], dist.ReduceOp.MAX)[0]


def all_reduce_max_list(values: Sequence[float]) -> list[float]:
    """Element-wise max over all ranks."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def sum_counts(counts: Dict[str, int]) -> Dict[str, int]:
    """{key: count} summed over all ranks; the key sets may differ between ranks (every rank
    ends with the union). Collective."""
    if not _live():
        return dict(counts)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counts))
    total: Dict[str, int] = {}
    for part in gathered:
        for k, v in part.items():
            total[k] = total.get(k, 0) + int(v)
    return dict(sorted(total.items()))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects)."""
    if not _live():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]


def shutdown() -> None:
    """Destroy the process group. Skipping this can make a finished SLURM task abort (134)."""
    global _ENV
    if _live():
        try:
            dist.destroy_process_group()
        except Exception as e:  # shutting down after a peer failure must not mask the real error
            log.warning("destroy_process_group failed: %s", e)
    _ENV = None

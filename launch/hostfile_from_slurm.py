"""Write a DeepSpeed hostfile (``host slots=N`` per line) for the current SLURM allocation.

    python -m swinv2_launch.hostfile_from_slurm -o hostfile            # inside salloc/sbatch
    deepspeed --hostfile hostfile --launcher slurm --no_ssh_check train/main.py ...

Hosts come from ``scontrol show hostnames $SLURM_JOB_NODELIST`` (it understands every hostlist
syntax). Slots per host, first match wins: ``--slots``, ``SLURM_GPUS_ON_NODE``,
``SLURM_NTASKS_PER_NODE``, the per-node entry of ``SLURM_TASKS_PER_NODE`` (``2(x3),1``), 1.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from typing import Mapping, Optional


def expand_tasks_per_node(spec: str) -> list[int]:
    """``"2(x3),1"`` -> ``[2, 2, 2, 1]`` (SLURM's compressed per-node counts)."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot parse tasks-per-node spec {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_hosts(nodelist: str) -> list[str]:
    r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                       text=True, timeout=60, check=True)
    return r.stdout.split()


def slots_per_host(n_hosts: int, env: Mapping[str, str], slots: Optional[int] = None
                   ) -> list[int]:
    if slots:
        return [slots] * n_hosts
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE"):
        v = env.get(var, "")
        if v.isdigit() and int(v) > 0:
            return [int(v)] * n_hosts
    spec = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE")
    if spec:
        counts = expand_tasks_per_node(spec)
        if len(counts) == n_hosts:
            return counts
    return [1] * n_hosts


def hostfile_text(hosts: list[str], slots: list[int]) -> str:
    return "".join(f"{h} slots={s}\n" for h, s in zip(hosts, slots))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", default="hostfile", help="path, or - for stdout")
    p.add_argument("--slots", type=int, default=None, help="slots per host (override)")
    p.add_argument("--nodelist", default=None, help="default: $SLURM_JOB_NODELIST")
    a = p.parse_args(argv)
    nodelist = a.nodelist or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        p.error("no --nodelist and SLURM_JOB_NODELIST is not set (run inside an allocation)")
    hosts = slurm_hosts(nodelist)
    text = hostfile_text(hosts, slots_per_host(len(hosts), os.environ, a.slots))
    if a.output == "-":
        sys.stdout.write(text)
    else:
        with open(a.output, "w") as f:
            f.write(text)
        print(f"wrote {a.output}: {len(hosts)} host(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

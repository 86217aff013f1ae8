"""swinv2-submit: fill a SLURM template from Hydra-style ``key=value`` settings and submit it.

    swinv2-submit nodes=2 gpus_per_node=8 time=24:00:00 partition=gpu account=proj \\
        -- experiment=swinv2_base_256_w8_1k train.batch_size=4096
    swinv2-submit --dry-run launcher=torchrun nodes=4 gpus_per_node=8 -- experiment=...
    swinv2-submit ntasks=2 gpus_per_node=0 -- train.max_steps=20          # CPU test cluster
    swinv2-submit nodes=1-2 gpus_per_node=8 -- experiment=...   # 2 nodes, or 1 if a node is lost

Cores: each task asks for its share of a node's cores (``--cpus-per-task`` = cores per node /
tasks per node), the cores per node from ``cores_per_node=N`` or else from ``sinfo`` (the smallest
node of ``partition``); ``cpus_per_task=N`` sets it, ``cpus_per_task=none`` leaves it to SLURM
(usually one core per task, shared by the rank and all its data workers). The script exports
``SRUN_CPUS_PER_TASK``, since srun does not take it from the allocation (SLURM >= 22.05).

``nodes=MIN-MAX`` is passed to sbatch as is: the job gets as many nodes as are free (up to MAX),
and after a node failure the requeued job may start on fewer (resuming at another world size).

Settings (before ``--``) become ``#SBATCH`` lines; everything after ``--`` is passed to the
trainer as Hydra overrides (embedded in the script, so a requeue replays them). The filled
script is printed before it is submitted; ``--dry-run`` only prints it. ``sbatch.<opt>=<v>``
passes any other sbatch option through (``sbatch.mail-type=END``).

Submit from any directory: the job runs there (run dirs default to ./runs/slurm-<job id>). The
script pins ``PYTHON`` to the interpreter running swinv2-submit (it has the package installed),
or to ``$PYTHON`` when set, and ``SWINV2_ENTRY`` to ``-m swinv2_train.main`` (the installed
trainer) or to ``$SWINV2_ENTRY`` when set; a script path there must exist relative to the
submit directory, or the submission (dry run too) is refused.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

TEMPLATES = {
    "srun": Path(__file__).resolve().parent / "slurm" / "train.sbatch",
    "torchrun": Path(__file__).resolve().parent / "slurm" / "train_torchrun.sbatch",
}

# setting -> sbatch option; None values are left to the template/SLURM defaults.
DEFAULTS: dict[str, Optional[str]] = {
    "launcher": "srun",          # srun: one task per GPU; torchrun: one torchrun per node
    "nodes": "1",
    "gpus_per_node": "8",        # 0 on CPU-only clusters
    "ntasks_per_node": None,     # default: gpus_per_node (srun) or 1 (torchrun)
    "ntasks": None,              # total tasks instead of per node (CPU clusters)
    "cpus_per_task": None,       # default: cores per node / tasks per node; "none": SLURM's default
    "cores_per_node": None,      # default: the smallest node of the partition, from sinfo
    "mem": None,
    "time": None,
    "partition": None,
    "account": None,
    "qos": None,
    "constraint": None,
    "job_name": None,
    "output": None,
    "signal_s": "300",           # USR1 this many seconds before the time limit
    "exclusive": None,           # true -> --exclusive
}
NOT_SBATCH = ("launcher", "cores_per_node")
OPTION = {k: "--" + k.replace("_", "-") for k in DEFAULTS if k not in NOT_SBATCH}
OPTION.update(job_name="--job-name", gpus_per_node="--gpus-per-node")


def parse(argv: list[str]) -> tuple[dict[str, str], dict[str, str], list[str], bool]:
    dry_run = False
    settings: dict[str, str] = {}
    passthrough: dict[str, str] = {}
    if "--" in argv:
        i = argv.index("--")
        head, overrides = argv[:i], argv[i + 1:]
    else:
        head, overrides = argv, []
    for arg in head:
        if arg in ("--dry-run", "-n"):
            dry_run = True
            continue
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"swinv2-submit: expected key=value before '--', got {arg!r} "
                             f"(trainer overrides go after '--')")
        if key.startswith("sbatch."):
            passthrough[key[len("sbatch."):]] = value
        elif key in DEFAULTS:
            settings[key] = value
        else:
            raise SystemExit(f"swinv2-submit: unknown setting {key!r}; known: "
                             f"{', '.join(DEFAULTS)} or sbatch.<option>")
    return settings, passthrough, overrides, dry_run


def sinfo_cores(partition: Optional[str]) -> tuple[Optional[int], str]:
    """The smallest CPU count of the partition's nodes (sinfo -N %c), and where it came from or
    why there is none."""
    cmd = ["sinfo", "-h", "-N", "-o", "%c"] + (["-p", partition] if partition else [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"sinfo failed: {e}"
    counts = [int(w.rstrip("+")) for w in r.stdout.split() if w.rstrip("+").isdigit()]
    if r.returncode != 0 or not counts:
        why = (r.stderr.strip().splitlines() or ["no nodes listed"])[-1]
        return None, f"sinfo gave no CPU count ({why})"
    return min(counts), f"sinfo: smallest node of {partition or 'the default partition'}"


def tasks_per_node(s: dict[str, str]) -> Optional[int]:
    if "ntasks_per_node" in s:
        return int(s["ntasks_per_node"])
    if "ntasks" in s and s["nodes"].isdigit():
        return -(-int(s["ntasks"]) // int(s["nodes"]))
    return 1 if "-" in s["nodes"] else None  # a node range: one task per node (see directives)


NO_SHARE = "# cpus_per_task: not set"


def cpu_share(s: dict[str, str], cores_of=None) -> list[str]:
    """Set s["cpus_per_task"] to each task's share of a node's cores, unless it is set; returns
    comment lines saying where the number came from (or why none was set)."""
    if "cpus_per_task" in s:
        if s["cpus_per_task"].lower() == "none":
            del s["cpus_per_task"]
        return []
    if "cores_per_node" in s:
        cores, source = int(s["cores_per_node"]), "cores_per_node"
    else:
        cores, source = (cores_of or sinfo_cores)(s.get("partition"))
    tasks = tasks_per_node(s)
    if cores is None or not tasks:
        return [f"{NO_SHARE} ({source})"]
    s["cpus_per_task"] = str(max(1, cores // tasks))
    return [f"# cpus_per_task: {cores} cores per node ({source}) / {tasks} tasks per node"]


def directives(settings: dict[str, str], passthrough: dict[str, str], cores_of=None) -> list[str]:
    s = {k: v for k, v in DEFAULTS.items() if v is not None}
    s.update(settings)
    launcher = s.pop("launcher")
    if launcher not in TEMPLATES:
        raise SystemExit(f"swinv2-submit: launcher must be one of {list(TEMPLATES)}")
    gpus = int(s.get("gpus_per_node") or 0)
    if gpus <= 0:
        s.pop("gpus_per_node", None)
    if "ntasks" not in s and "ntasks_per_node" not in s:
        per_node = gpus if launcher == "srun" and gpus > 0 else 1
        # A node range (nodes=1-2) with one task per node gets its smallest count: sbatch derives
        # ntasks = min nodes x tasks per node = 1 and SLURM never allocates more nodes than tasks
        # (seen on 22.05). Left out, SLURM allocates one task per node anyway, as many nodes as
        # are free, and the templates' srun starts one task per node.
        if not (per_node == 1 and "-" in s["nodes"]):
            s["ntasks_per_node"] = str(per_node)
    if launcher == "torchrun" and "ntasks" in s:
        raise SystemExit("swinv2-submit: launcher=torchrun runs one task per node; "
                         "use nodes=/gpus_per_node= instead of ntasks=")
    notes = cpu_share(s, cores_of)
    s.pop("cores_per_node", None)
    lines = [f"#SBATCH --signal=USR1@{int(s.pop('signal_s'))}", "#SBATCH --requeue"]
    if str(s.pop("exclusive", "")).lower() in ("1", "true", "yes"):
        lines.append("#SBATCH --exclusive")
    for key, value in s.items():
        lines.append(f"#SBATCH {OPTION[key]}={value}")
    for key, value in passthrough.items():
        lines.append(f"#SBATCH --{key}" + (f"={value}" if value != "" else ""))
    return lines + notes


DEFAULT_ENTRY = "-m swinv2_train.main"  # the installed trainer: works from any submit directory


def entry_point(env: dict[str, str], submit_dir: str) -> str:
    """The trainer the job starts: $SWINV2_ENTRY (a script path or `-m module`) or the installed
    module. The job cd's to the submit directory, so a script path must exist from there; a
    missing one would only fail once the job runs (after waiting in the queue)."""
    entry = env.get("SWINV2_ENTRY", "").strip() or DEFAULT_ENTRY
    try:
        words = shlex.split(entry)
    except ValueError as e:  # unbalanced quotes
        raise SystemExit(f"swinv2-submit: SWINV2_ENTRY={entry}: {e}; give a script path or '-m module'") from None
    if words[0] != "-m":
        script = os.path.join(submit_dir, words[0])
        if not os.path.isfile(script):
            raise SystemExit(
                f"swinv2-submit: SWINV2_ENTRY={entry}: no such script {os.path.abspath(script)} (the job runs "
                f"in the submit directory {submit_dir}); unset SWINV2_ENTRY to run the installed trainer "
                f"({DEFAULT_ENTRY}), give the script's absolute path, or submit from the directory it is "
                f"relative to")
    return entry


def pinned_environment(env: dict[str, str], submit_dir: str) -> list[str]:
    """Lines that fix the job's interpreter and entry point at submit time (a requeued job replays
    them): $PYTHON if set, else this interpreter, which has the package; a bare `python` on the
    compute node might not."""
    python = env.get("PYTHON", "").strip() or sys.executable
    return ["# --- pinned by swinv2-submit: the interpreter and the trainer entry point",
            f"export PYTHON={shlex.quote(python)}",
            f"export SWINV2_ENTRY={shlex.quote(entry_point(env, submit_dir))}"]


def render(settings: dict[str, str], passthrough: dict[str, str], overrides: list[str],
           env: Optional[dict[str, str]] = None, submit_dir: Optional[str] = None, cores_of=None) -> str:
    launcher = settings.get("launcher", DEFAULTS["launcher"])
    template = TEMPLATES.get(launcher)
    if template is None:
        raise SystemExit(f"swinv2-submit: launcher must be one of {list(TEMPLATES)}")
    lines = template.read_text().splitlines()
    env = dict(os.environ) if env is None else env
    inject = [*pinned_environment(env, submit_dir or os.getcwd())]  # refusals come before sinfo is asked
    ours = directives(settings, passthrough, cores_of)
    # sbatch stops reading #SBATCH at the first command, so ours go into the header; template
    # directives for the same option are dropped (ours win, and no duplicate lines confuse).
    ours_opts = {re.split(r"[ =]", d.split()[1], maxsplit=1)[0] for d in ours}
    kept = [ln for ln in lines
            if not (ln.startswith("#SBATCH ")
                    and re.split(r"[ =]", ln.split()[1], maxsplit=1)[0] in ours_opts)]
    last = max(i for i, ln in enumerate(kept) if ln.startswith("#SBATCH ") or i == 0)
    body = kept[:last + 1] + ["# --- filled by swinv2-submit"] + ours + kept[last + 1:]
    # The interpreter/entry and the overrides (prepended to "$@") go right after the header:
    # sbatch stores the script, so a requeued job replays exactly these.
    body_text = "\n".join(body) + "\n"
    marker = "set -euo pipefail\n"
    if any(d.startswith("#SBATCH --cpus-per-task=") for d in ours):  # srun >= 22.05 does not inherit it
        inject.append('export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK}"')
    if overrides:
        inject.append("set -- " + " ".join(shlex.quote(o) for o in overrides) + ' "$@"')
    return body_text.replace(marker, marker + "\n".join(inject) + "\n", 1)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    settings, passthrough, overrides, dry_run = parse(argv)
    script = render(settings, passthrough, overrides)
    for note in (ln for ln in script.splitlines() if ln.startswith(NO_SHARE)):
        print(f"swinv2-submit: no --cpus-per-task{note[len(NO_SHARE):]}: each task gets SLURM's default, "
              f"often one core for a rank and all its data workers; set cpus_per_task=N or cores_per_node=N",
              file=sys.stderr)
    sys.stdout.write(script)
    sys.stdout.flush()
    if dry_run:
        return 0
    # The script goes in on stdin: nothing is left on disk, and SLURM keeps its own copy.
    r = subprocess.run(["sbatch", "--parsable"], input=script, text=True, capture_output=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        return r.returncode
    job_id = r.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}", file=sys.stderr)
    print(job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())

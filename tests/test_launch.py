"""launch/: submit tool, hostfile and .deepspeed_env helpers (fast), and the real launchers
running the real trainer (slow): deepspeed --num_gpus 2 and torchrun --nproc_per_node 2 on the
CPU accelerator agree on the loss; a rank killed with -9 makes its peer fail in bounded time and
a restart resumes from the last committed checkpoint.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import REPO, TINY_TRAIN, committed_steps, train_losses, wait_until

sys.path.insert(0, str(REPO))
from swinv2_launch import deepspeed_env, hostfile_from_slurm, submit  # noqa: E402
from swinv2_train.distributed import free_port  # noqa: E402

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
               "TORCHELASTIC_RUN_ID", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- submit
def test_submit_dry_run_fills_template(capsys):
    rc = submit.main(["--dry-run", "nodes=2", "gpus_per_node=8", "time=24:00:00",
                      "partition=gpu", "account=proj", "sbatch.mail-type=END", "--",
                      "experiment=swinv2_base_256_w8_1k", "run.name=a b"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --time=24:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --signal=USR1@300", "#SBATCH --requeue", "#SBATCH --mail-type=END"):
        assert line in out.splitlines(), line
    directives = [ln for ln in out.splitlines() if ln.startswith("#SBATCH")]
    assert sum("--signal=" in d for d in directives) == 1
    assert directives.count("#SBATCH --requeue") == 1
    assert "set -- experiment=swinv2_base_256_w8_1k 'run.name=a b' \"$@\"" in out
    # every directive precedes the first command, or sbatch would ignore it
    first_cmd = next(i for i, ln in enumerate(out.splitlines())
                     if ln and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(out.splitlines())
               if ln.startswith("#SBATCH"))
    r = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr


def test_submit_cpu_and_torchrun_shapes():
    s, p, o, dry = submit.parse(["ntasks=2", "gpus_per_node=0", "--", "train.max_steps=3"])
    text = submit.render(s, p, o)
    d = "\n".join(ln for ln in text.splitlines() if ln.startswith("#SBATCH"))
    assert "#SBATCH --ntasks=2" in d and "--gpus-per-node" not in d
    assert "--ntasks-per-node" not in d and not dry
    s, p, o, _ = submit.parse(["launcher=torchrun", "nodes=4", "gpus_per_node=8"])
    text = submit.render(s, p, o)
    assert "torch.distributed.run" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "#SBATCH --nodes=4" in text


@pytest.mark.parametrize("argv, per_node", [
    (["nodes=1-2", "gpus_per_node=0"], None), (["nodes=1-2", "launcher=torchrun"], None),
    (["nodes=1-2", "gpus_per_node=1"], None), (["nodes=1-2", "gpus_per_node=8"], "8"),
    (["nodes=1-2", "gpus_per_node=0", "ntasks_per_node=1"], "1")])
def test_submit_node_range_passes_through(argv, per_node):
    """nodes=MIN-MAX goes to sbatch as is. One task per node is left to SLURM's default: with
    --ntasks-per-node=1 a range only ever gets its minimum (tests/test_multinode.py runs one)."""
    s, p, o, _ = submit.parse(argv)
    d = [ln for ln in submit.render(s, p, o).splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --nodes=1-2" in d
    assert [x for x in d if "--ntasks-per-node" in x] == (
        [f"#SBATCH --ntasks-per-node={per_node}"] if per_node else [])


@pytest.mark.parametrize("argv", [["bogus=1"], ["nodes"], ["launcher=mpi"],
                                  ["launcher=torchrun", "ntasks=2"]])
def test_submit_rejects_bad_settings(argv):
    with pytest.raises(SystemExit):
        s, p, o, _ = submit.parse(argv)
        submit.render(s, p, o)


def test_sbatch_templates_parse():
    for name in ("train.sbatch", "train_torchrun.sbatch"):
        path = REPO / "launch" / "slurm" / name
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        text = path.read_text()
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=USR1@" in text
        # no "B:": the tasks must get the signal directly (verified on the SLURM test cluster)
        assert not any("B:" in ln for ln in text.splitlines() if ln.startswith("#SBATCH"))
        assert 'cd "${SLURM_SUBMIT_DIR' in text and "/work/" not in text


def _submit_dry_run(cwd, **env):
    """`python -m swinv2_launch.submit --dry-run` in `cwd` (any directory) with `env` on top."""
    base = clean_env(**env)
    for name in ("PYTHON", "SWINV2_ENTRY"):
        if name not in env:
            base.pop(name, None)
    return subprocess.run([sys.executable, "-m", "swinv2_launch.submit", "--dry-run", "ntasks=2",
                           "gpus_per_node=0", "--", "train.max_steps=3"], cwd=cwd, env=base,
                          capture_output=True, text=True, timeout=60)


def test_submit_from_another_directory_pins_interpreter_and_entry(tmp_path):
    r = _submit_dry_run(tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"export PYTHON={sys.executable}" in lines  # the interpreter that has the package
    assert "export SWINV2_ENTRY='-m swinv2_train.main'" in lines  # the installed trainer, not a path
    assert "train/main.py" not in r.stdout
    # pinned before the template reads them (PYTHON=${PYTHON:-python} keeps ours)
    assert lines.index(f"export PYTHON={sys.executable}") < next(
        i for i, ln in enumerate(lines) if ln.startswith("PYTHON=${PYTHON"))
    check = subprocess.run(["bash", "-n"], input=r.stdout, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    # and that interpreter runs the entry point from this directory
    probe = subprocess.run([sys.executable, "-c", "import swinv2_train.main"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr


def test_submit_keeps_a_users_python_and_script_entry(tmp_path):
    (tmp_path / "my_train.py").write_text("print('hi')\n")
    r = _submit_dry_run(tmp_path, PYTHON="/opt/py/bin/python", SWINV2_ENTRY="my_train.py")
    assert r.returncode == 0, r.stderr
    assert "export PYTHON=/opt/py/bin/python" in r.stdout.splitlines()
    assert "export SWINV2_ENTRY=my_train.py" in r.stdout.splitlines()


@pytest.mark.parametrize("entry", ["train/main.py", "missing.py --flag"])
def test_submit_refuses_a_script_entry_that_does_not_exist(tmp_path, entry, monkeypatch):
    r = _submit_dry_run(tmp_path, SWINV2_ENTRY=entry)
    assert r.returncode != 0 and r.stdout == ""  # refused before any script is printed
    err = r.stderr.strip()
    assert err.startswith(f"swinv2-submit: SWINV2_ENTRY={entry}: no such script") and len(err.splitlines()) == 1
    assert "unset SWINV2_ENTRY" in err and "Traceback" not in r.stderr
    # the real submission is refused the same way, before sbatch is called
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWINV2_ENTRY", entry)
    monkeypatch.setattr(submit.subprocess, "run", lambda *a, **k: pytest.fail("sbatch was called"))
    with pytest.raises(SystemExit, match="SWINV2_ENTRY"):
        submit.main(["ntasks=2", "gpus_per_node=0"])


# ----------------------------------------------------------------------------- hostfile
def test_tasks_per_node_spec():
    assert hostfile_from_slurm.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert hostfile_from_slurm.expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        hostfile_from_slurm.expand_tasks_per_node("2(y3)")


def test_slots_priority():
    f = hostfile_from_slurm.slots_per_host
    assert f(2, {"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "4"}) == [8, 8]
    assert f(2, {"SLURM_NTASKS_PER_NODE": "4"}) == [4, 4]
    assert f(3, {"SLURM_TASKS_PER_NODE": "2(x2),1"}) == [2, 2, 1]
    assert f(2, {}) == [1, 1]
    assert f(2, {"SLURM_GPUS_ON_NODE": "8"}, slots=2) == [2, 2]


def test_hostfile_cli_uses_scontrol(tmp_path):
    conf = tmp_path / "slurm.conf"  # scontrol needs a config; it contacts nothing for this
    conf.write_text("ClusterName=u\nSlurmctldHost=localhost\n"
                    "NodeName=gpu[001-003] CPUs=1\nPartitionName=p Nodes=gpu[001-003]\n")
    env = clean_env(SLURM_CONF=str(conf), SLURM_JOB_NODELIST="gpu[001-003]",
                    SLURM_TASKS_PER_NODE="4(x2),2")
    out = tmp_path / "hostfile"
    r = subprocess.run([sys.executable, "-m", "swinv2_launch.hostfile_from_slurm", "-o", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "gpu001 slots=4\ngpu002 slots=4\ngpu003 slots=2\n"


# ----------------------------------------------------------------------------- .deepspeed_env
def test_deepspeed_env_selection_and_format(tmp_path):
    env = {"NCCL_DEBUG": "WARN", "WANDB_PROJECT": "swin v2", "WANDB_API_KEY": "secret",
           "PYTHONPATH": "/a:/b", "HOME": "/root", "NCCL_EMPTY": "", "FI_BAD": "x\ny"}
    sel = deepspeed_env.select(env)
    assert sel == {"NCCL_DEBUG": "WARN", "PYTHONPATH": "/a:/b", "WANDB_PROJECT": "swin v2"}
    path = deepspeed_env.write(str(tmp_path / ".deepspeed_env"), sel)
    lines = Path(path).read_text().splitlines()
    assert lines == ["NCCL_DEBUG=WARN", "PYTHONPATH=/a:/b", "WANDB_PROJECT=swin v2"]
    # the launcher's parser: split at the first '=' on every line, no blank lines
    assert all(len(ln.split("=", 1)) == 2 and ln for ln in lines)


def test_deepspeed_env_cli(tmp_path):
    out = tmp_path / "dsenv"
    r = subprocess.run([sys.executable, "-m", "swinv2_launch.deepspeed_env", "-o", str(out), "--only",
                        "--var", "MY_VAR", "--set", "NCCL_DEBUG=INFO"], cwd=REPO,
                       env=clean_env(MY_VAR="1", NCCL_SOCKET_IFNAME="lo"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "MY_VAR=1\nNCCL_DEBUG=INFO\n"


# ----------------------------------------------------------------------------- real launchers
def _run(cmd: list[str], run_dir: Path, timeout: float = 240) -> str:
    r = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True,
                       timeout=timeout)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    return log


@pytest.mark.slow
def test_deepspeed_launcher_and_torchrun_agree(tmp_path):
    steps = ["train.max_steps=3", *TINY_TRAIN]
    ds_dir, tr_dir = tmp_path / "ds", tmp_path / "torchrun"
    # deepspeed on CPU: --num_gpus N works without GPUs (it only sets CUDA_VISIBLE_DEVICES);
    # loopback master and a free port (the 29500 default may be taken on a shared machine).
    ds_log = _run(["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), "train/main.py", f"run.dir={ds_dir}",
                   *steps], ds_dir)
    tr_log = _run(["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), "train/main.py", f"run.dir={tr_dir}",
                   *steps], tr_dir)
    assert "world 2 (deepspeed)" in ds_log and "--local_rank=0" in ds_log  # stripped by main
    assert "world 2 (torchrun)" in tr_log
    ds, tr = train_losses(ds_dir), train_losses(tr_dir)
    assert [s for s, _ in ds] == [1, 2, 3] == [s for s, _ in tr]
    for (_, a), (_, b) in zip(ds, tr):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert committed_steps(ds_dir) == [3] and committed_steps(tr_dir) == [3]


@pytest.mark.slow
def test_kill9_rank_fails_peer_in_bounded_time_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    timeout_s = 30
    total = 20  # headroom: the kill must land mid-run even at ~0.1 s/step
    args = ["train/main.py", f"run.dir={run_dir}", f"train.max_steps={total}",
            "train.ckpt_every=2", f"train.dist_timeout_s={timeout_s}", *TINY_TRAIN]

    def start():
        port = str(free_port())
        # Bare env:// ranks (as srun tasks without --kill-on-bad-exit): no agent kills the
        # survivor for us, so this tests the trainer's own failure detection.
        return [subprocess.Popen([sys.executable, "-u", *args], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=clean_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                               MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                                 start_new_session=True)
                for r in range(2)]

    procs = start()
    try:
        wait_until(lambda: committed_steps(run_dir) and max(s for s, _ in train_losses(run_dir))
                   > committed_steps(run_dir)[-1], 180, "a committed checkpoint and a step past it",
                   procs=procs)
        procs[1].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        out0, _ = procs[0].communicate(timeout=timeout_s + 90)
        waited = time.monotonic() - t_kill
        procs[1].wait(timeout=10)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode != 0, out0[-4000:]
    assert waited < timeout_s + 60, f"survivor took {waited:.0f}s to fail"
    assert re.search(r"(?i)(connection|gloo|peer|timed? ?out|closed|reset)", out0), out0[-4000:]

    last = committed_steps(run_dir)[-1]
    assert 2 <= last < total
    procs = start()  # the same command again: auto-resume
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    assert f"step_{last:08d}" in outs[0] and "resumed from" in outs[0]
    steps = [s for s, _ in train_losses(run_dir)]
    restart_at = len(steps) - 1 - steps[::-1].index(last + 1)  # the restart's first step
    resumed = steps[restart_at:]
    assert resumed == list(range(last + 1, total + 1))
    assert committed_steps(run_dir)[-1] == total


# ----------------------------------------------------------------------------- submit: cores per task
def _sbatch_lines(text):
    return [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]


@pytest.mark.parametrize("argv, cpus", [
    (["nodes=2", "gpus_per_node=8", "cores_per_node=64"], "8"),            # 8 ranks a node
    (["launcher=torchrun", "nodes=4", "gpus_per_node=8", "cores_per_node=64"], "64"),  # one torchrun a node
    (["ntasks=2", "gpus_per_node=0", "cores_per_node=6"], "3"),            # a CPU node, 2 tasks
    (["nodes=2", "gpus_per_node=8", "cores_per_node=64", "cpus_per_task=4"], "4"),   # the setting wins
    (["nodes=2", "gpus_per_node=8", "cores_per_node=4"], "1")])             # never 0
def test_submit_asks_for_each_ranks_share_of_a_nodes_cores(argv, cpus):
    s, p, o, _ = submit.parse(argv)
    text = submit.render(s, p, o, cores_of=lambda partition: (None, "not asked"))
    assert f"#SBATCH --cpus-per-task={cpus}" in _sbatch_lines(text)
    assert 'export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK}"' in text  # srun >= 22.05 does not inherit it
    assert "--cores-per-node" not in text


def test_submit_takes_cores_per_node_from_sinfo_or_says_why_not(capsys, monkeypatch):
    asked = []

    def cores_of(partition):
        asked.append(partition)
        return 48, "sinfo: smallest node of gpu"
    s, p, o, _ = submit.parse(["nodes=2", "gpus_per_node=4", "partition=gpu"])
    text = submit.render(s, p, o, cores_of=cores_of)
    assert asked == ["gpu"] and "#SBATCH --cpus-per-task=12" in _sbatch_lines(text)
    assert "# cpus_per_task: 48 cores per node (sinfo: smallest node of gpu) / 4 tasks per node" in text
    s, p, o, _ = submit.parse(["nodes=2", "gpus_per_node=4"])
    text = submit.render(s, p, o, cores_of=lambda partition: (None, "sinfo failed: no such file"))
    assert not [ln for ln in _sbatch_lines(text) if "cpus-per-task" in ln] and "SRUN_CPUS_PER_TASK" not in text
    assert "# cpus_per_task: not set (sinfo failed: no such file)" in text
    monkeypatch.setattr(submit, "sinfo_cores", lambda partition: (None, "sinfo failed: no such file"))
    assert submit.main(["--dry-run", "nodes=2", "gpus_per_node=4"]) == 0  # the script, and one line why
    err = capsys.readouterr().err
    assert err.count("no --cpus-per-task (sinfo failed: no such file)") == 1 and "cpus_per_task=N" in err
    s, p, o, _ = submit.parse(["nodes=2", "gpus_per_node=4", "cpus_per_task=none"])
    text = submit.render(s, p, o, cores_of=lambda partition: pytest.fail("asked sinfo"))
    assert not [ln for ln in _sbatch_lines(text) if "cpus-per-task" in ln]


def test_sinfo_cores_reads_the_smallest_node(tmp_path, monkeypatch):
    """sinfo's output as SLURM prints it (-h -N -o %c: one CPU count per node, '+' for a range),
    read by a stand-in `sinfo` on PATH that records its arguments."""
    fake = tmp_path / "sinfo"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\nprintf '64\\n32+\\n64\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert submit.sinfo_cores("gpu") == (32, "sinfo: smallest node of gpu")
    assert (tmp_path / "args").read_text().split() == ["-h", "-N", "-o", "%c", "-p", "gpu"]
    fake.write_text("#!/bin/sh\necho 'sinfo: error: no controller' >&2\nexit 1\n")
    cores, why = submit.sinfo_cores(None)
    assert cores is None and "no controller" in why

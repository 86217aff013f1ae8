"""The project's SLURM launch path on a real single-node cluster (munged + slurmctld + slurmd on
127.0.0.1, started and stopped by tests/slurm_cluster.py).

Verified behaviour these tests pin down (SLURM 22.05):
* ``scancel -s USR1 <job>`` and ``#SBATCH --signal=USR1@N`` (no ``B:``) signal every task of
  every step directly; the batch shell is not signalled. ``scancel -b``/``--signal=B:`` reach
  only the batch shell, which train.sbatch forwards to srun, which relays it to the tasks.
* ``scontrol requeue`` keeps the job id (so the run dir), sets ``SLURM_RESTART_COUNT`` and makes
  the job eligible again after the credential lifetime (``AuthInfo=cred_expire``, default
  120 s; the test cluster uses the minimum).
"""
from __future__ import annotations

import json
import re
import sys

import pytest

from slurm_cluster import (REPO, TINY_TRAIN, SlurmCluster, committed_steps, have_slurm,
                           train_losses, wait_until)

pytestmark = pytest.mark.slow
HAVE_SLURM, WHY = have_slurm()
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
_reference: dict[str, list] = {}  # the uninterrupted run's losses, for the preemption test


@pytest.fixture(scope="module")
def slurm():
    if not HAVE_SLURM:
        pytest.skip(WHY)
    cluster = SlurmCluster(cpus=2).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _job_env(cluster: SlurmCluster) -> dict[str, str]:
    env = {k: v for k, v in cluster.env.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def test_cluster_two_task_gloo_job(slurm, tmp_path):
    """Fixture sanity: srun tasks map SLURM_* to a real 2-rank gloo group."""
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\nsrun {sys.executable} -u tests/test_distributed.py "
                      "allreduce\n")
    out = tmp_path / "job.out"
    job = slurm.sbatch("--ntasks=2", "-o", str(out), str(script), cwd=REPO,
                       env=_job_env(slurm))
    info = slurm.wait_state(job, DONE, 120)
    assert info["JobState"] == "COMPLETED", out.read_text()
    recs = sorted(_json_lines(out.read_text()), key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"], r["launcher"]) for r in recs] == \
        [(0, 2, "slurm"), (1, 2, "slurm")]
    assert all(r["max"] == 2.5 and r["flag_any"] == 1.0 for r in recs)


def test_deepspeed_slurm_launcher_with_hostfile_and_env_helpers(slurm, tmp_path):
    """hostfile_from_slurm + .deepspeed_env + `deepspeed --launcher slurm` inside a job."""
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
set -e
cd {tmp_path}
export PYTHONPATH={REPO}
{sys.executable} -m launch.hostfile_from_slurm -o hostfile
{sys.executable} -m launch.deepspeed_env --only --set SWINV2_PROBE=from-deepspeed-env
cat hostfile .deepspeed_env
# one host: --force_multi makes the runner use srun anyway; no ssh on a test box
deepspeed --hostfile hostfile --launcher slurm --force_multi --no_ssh_check \\
    --master_addr 127.0.0.1 {REPO}/tests/test_distributed.py allreduce
""")
    out = tmp_path / "job.out"
    job = slurm.sbatch("--ntasks=2", "-o", str(out), str(script), cwd=tmp_path,
                       env=_job_env(slurm))
    info = slurm.wait_state(job, DONE, 120)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert "localhost slots=2" in text and "SWINV2_PROBE=from-deepspeed-env" in text
    recs = sorted(_json_lines(text), key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"], r["launcher"], r["probe"]) for r in recs] == \
        [(0, 2, "slurm", "from-deepspeed-env"), (1, 2, "slurm", "from-deepspeed-env")]


def test_train_sbatch_two_task_zero1_to_completion(slurm, tmp_path):
    run_dir = tmp_path / "ref"
    out = tmp_path / "train.out"
    job = slurm.sbatch("--ntasks=2", "-o", str(out), "launch/slurm/train.sbatch",
                       f"run.dir={run_dir}", "train.max_steps=6", *TINY_TRAIN,
                       cwd=REPO, env=_job_env(slurm))
    info = slurm.wait_state(job, DONE, 300)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", text[-6000:]
    assert "world 2 (slurm)" in text and "ZeRO stage 1" in text
    losses = train_losses(run_dir)
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert committed_steps(run_dir) == [6]
    _reference["losses"] = losses


def test_submit_from_another_directory_runs_to_completion(slurm, tmp_path):
    """swinv2-submit from a directory that is not the repository: the job runs the installed
    trainer with the pinned interpreter; the run dir defaults to ./runs/slurm-<job id> there."""
    out = tmp_path / "job.out"
    env = _job_env(slurm)
    env.pop("PYTHON", None)
    env.pop("SWINV2_ENTRY", None)
    env.pop("PYTHONPATH", None)  # only the installed package
    r = slurm.run(sys.executable, "-m", "swinv2_launch.submit", "ntasks=2", "gpus_per_node=0",
                  f"output={out}", "--", "train.max_steps=3", *TINY_TRAIN,
                  cwd=tmp_path, env=env, timeout=60)
    job = r.stdout.strip().splitlines()[-1]
    assert job.isdigit(), r.stdout + r.stderr
    assert f"export PYTHON={sys.executable}" in r.stdout
    # each of the 2 tasks asks for its share of the node's cores, read from this cluster's sinfo
    assert re.search(r"^#SBATCH --cpus-per-task=\d+$", r.stdout, re.M), r.stdout
    assert "cores per node (sinfo: smallest node of the default partition) / 2 tasks per node" in r.stdout
    info = slurm.wait_state(job, DONE, 300)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", text[-6000:]
    assert "world 2 (slurm)" in text and "-m swinv2_train.main" in text
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    assert [s for s, _ in train_losses(run_dir)] == [1, 2, 3]
    assert committed_steps(run_dir) == [3]


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, tmp_path):
    """Submitted with swinv2-submit (the same template); USR1 mid-run -> all ranks stop at one
    step boundary, commit a checkpoint, rank 0 requeues, the same job id resumes and finishes."""
    run_dir = tmp_path / "pre"
    out = tmp_path / "pre.out"
    # Long enough that the signal (sent after step 2) lands well before the end even when the
    # machine is idle (~0.1 s/step); the first 6 steps are comparable with the reference run
    # because the LR warmup (20 steps) does not depend on the total.
    steps_total = 20
    r = slurm.run(sys.executable, "-m", "swinv2_launch.submit", "ntasks=2", "gpus_per_node=0",
                  f"output={out}", "--", f"run.dir={run_dir}", f"train.max_steps={steps_total}",
                  *TINY_TRAIN,
                  cwd=REPO, env=_job_env(slurm), timeout=60)
    job = r.stdout.strip().splitlines()[-1]
    assert job.isdigit(), r.stdout + r.stderr
    assert "#SBATCH --ntasks=2" in r.stdout  # the script was printed before submitting

    wait_until(lambda: any(s >= 2 for s, _ in train_losses(run_dir)), 180, "step 2",
               poll=0.1)
    assert slurm.job_state(job) == "RUNNING"
    slurm.run("scancel", "-s", "USR1", job)   # what `--signal=USR1@N` does at the time limit

    info = slurm.wait_state(job, DONE, 300)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", text[-6000:]
    assert info["Restarts"] == "1", info
    assert "requeued SLURM job" in text and "restart 1" in text

    steps = [s for s, _ in train_losses(run_dir)]
    ckpts = committed_steps(run_dir)
    assert len(ckpts) == 2 and ckpts[-1] == steps_total, ckpts  # preemption + final save
    k = ckpts[0]
    assert 2 <= k < steps_total
    assert re.search(rf"resumed from \S*step_{k:08d}", text), text[-6000:]
    # both ranks stopped at step k: nothing was trained past the checkpoint, and the requeued
    # job continued at k + 1 up to the final step
    assert steps == list(range(1, steps_total + 1)), steps
    ref = _reference.get("losses")
    if ref and k < len(ref):  # same config and seed as the uninterrupted run: resume is exact
        got = train_losses(run_dir)
        for (s, a), (_, b) in zip(got, ref):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5), (s, got, ref)


def test_torchrun_sbatch_one_node_two_workers(slurm, tmp_path):
    """train_torchrun.sbatch: one srun task per node running torchrun (c10d rendezvous)."""
    run_dir = tmp_path / "trun"
    out = tmp_path / "trun.out"
    env = _job_env(slurm)
    env["NPROC_PER_NODE"] = "2"
    job = slurm.sbatch("--nodes=1", "--cpus-per-task=2", "-o", str(out),
                       "launch/slurm/train_torchrun.sbatch", f"run.dir={run_dir}",
                       "train.max_steps=3", *TINY_TRAIN, cwd=REPO, env=env)
    info = slurm.wait_state(job, DONE, 240)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", text[-6000:]
    assert "world 2 (torchrun)" in text
    assert [s for s, _ in train_losses(run_dir)] == [1, 2, 3]
    ref = _reference.get("losses")
    if ref:  # same data order and warmup LR as the srun-launched reference run
        for (_, a), (_, b) in zip(train_losses(run_dir), ref):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6)

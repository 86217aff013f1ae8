"""Two-node training on a real cluster on one machine (tests/multinode_cluster.py: node1 =
127.0.0.2 and node2 = 127.0.0.3, each with its own slurmd and sshd in its own UTS + mount
namespace; slurmctld on 127.0.0.1).

Every launch path starts the real trainer as 4 ranks, 2 per node (ZeRO-1 over gloo,
DS_ACCELERATOR=cpu, a tiny model, a few steps), and must
* place two ranks on each host: every rank prints ``rank r/N on HOST (node i, local rank l)``
  (train/distributed.py), and
* train exactly as 4 ranks on one node do: the same ``train/loss`` at every step (same world
  size, so the same data per rank and the same gloo reductions).

Paths: ``sbatch train.sbatch`` (srun task per rank), ``sbatch train_torchrun.sbatch`` (srun task
per node running torchrun), ``deepspeed --launcher pdsh`` over ssh, two ``torchrun`` agents
(c10d rendezvous), and ``deepspeed --launcher slurm`` inside an allocation.

Losing a node: every process of node2 is SIGKILLed mid-run; the ranks on node1 must stop by
themselves within the collective timeout, SLURM must requeue the job, and the requeued job must
resume from the last committed checkpoint and finish, on two nodes once node2 is back (with the
weights of an uninterrupted run) or on node1 alone when the job allows ``--nodes=1-2``.
"""
from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from multinode_cluster import MultiNodeCluster, have_multinode
from slurm_cluster import REPO, committed_steps, train_losses, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.multinode]
HAVE_CLUSTER, WHY = have_multinode()
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
RUN_TIMEOUT = 300  # seconds per launch; a run takes 20-45 s on a busy 2-core machine
STEPS = 4

# 4 ranks x 4 images per step of a tiny model; one intra-op thread per rank (4 ranks share 2
# cores), no data workers, no W&B/TensorBoard/probes/export.
TRAIN_ARGS = ["model.img_size=32", "model.embed_dim=16", "model.depths=[1,1,1,1]",
              "model.num_heads=[1,2,2,4]", "train.batch_size=16", f"train.max_steps={STEPS}",
              "train.eval_every=0", "train.log_every=1", "train.amp_every=0",
              "train.cpu_threads=1", "train.progress=lines", "train.eval_batch_size=256",
              "data.num_workers=0", "data.shuffle_buffer=0", "logger=none",
              "run.export_official=false"]
RANK_LINE = re.compile(r"rank (\d+)/(\d+) on (\S+) \(node (\d+), local rank (\d+)\)")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "GROUP_RANK", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE",
               "TORCHELASTIC_RUN_ID", "DS_ENV_FILE")


@pytest.fixture(scope="module")
def cluster():
    if not HAVE_CLUSTER:
        pytest.skip(WHY)
    c = MultiNodeCluster(cpus_per_node=2)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def env(cluster):
    """Environment for launchers and jobs: the cluster's SLURM_CONF, CPU DeepSpeed, no
    inherited rank variables."""
    e = {k: v for k, v in cluster.env.items()
         if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "PMI_"))}
    e["SLURM_CONF"] = cluster.env["SLURM_CONF"]
    e.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
             PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    return e


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """train/loss per step of 4 ranks on one host (the deepspeed launcher, loopback)."""
    tmp = tmp_path_factory.mktemp("ref")
    run_dir = tmp / "run"
    port = _free_loopback_port()
    cmd = [_bin("deepspeed"), "--num_gpus", "4", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "train/main.py", f"run.dir={run_dir}", *TRAIN_ARGS]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=RUN_TIMEOUT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    losses = train_losses(run_dir)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1)), out[-4000:]
    return losses


# -- helpers ------------------------------------------------------------------------------------
def _bin(name: str) -> str:
    """The launcher next to this interpreter (PATH may hold only a shim)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name) or name


def _free_loopback_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_placement(text: str) -> dict[int, tuple[str, int, int]]:
    """rank -> (host, node index, local rank) from the ``rank r/4 on ...`` lines."""
    return {int(r): (host, int(node), int(local))
            for r, world, host, node, local in RANK_LINE.findall(text) if world == "4"}


def assert_two_ranks_per_node(text: str, rank0_on_node1: bool = True) -> None:
    """Two ranks (local ranks 0 and 1) on each host, one node index per host. Rank 0 is on
    node1 where the launch puts it there (srun's block distribution, the deepspeed hostfile
    order); torchrun's rendezvous numbers the nodes itself."""
    placed = rank_placement(text)
    assert sorted(placed) == [0, 1, 2, 3], text[-6000:]
    for host in ("node1", "node2"):
        here = [v for v in placed.values() if v[0] == host]
        assert sorted(local for _, _, local in here) == [0, 1], placed
        assert len({node for _, node, _ in here}) == 1, placed  # one node index per host
    assert {node for _, node, _ in placed.values()} == {0, 1}, placed
    if rank0_on_node1:
        assert placed[0][0] == "node1", placed


def assert_same_losses(run_dir: Path, reference, text: str) -> None:
    got = train_losses(run_dir)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), text[-6000:]
    for (step, a), (_, b) in zip(got, reference):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (step, got, reference)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait for ``procs``; past ``timeout``, SIGKILL them (never SIGTERM a pdsh-launching
    deepspeed: its handler runs `pdsh pkill -f ...`, machine-wide here) and fail."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            raise


def run_on_nodes(cluster: MultiNodeCluster, commands: dict[str, list[str]], env: dict,
                 tmp_path: Path) -> str:
    """Run one command per node inside that node's namespaces (from REPO); their output."""
    logs = {node: open(tmp_path / f"{node}.log", "w") for node in commands}
    procs = [subprocess.Popen(cluster.node_cmd(node, cmd, cwd=REPO), env=env,
                              stdout=logs[node], stderr=subprocess.STDOUT,
                              start_new_session=True)
             for node, cmd in commands.items()]
    try:
        wait_all(procs, RUN_TIMEOUT)
    finally:
        for f in logs.values():
            f.close()
        if any(p.returncode != 0 for p in procs):
            cluster.kill_strays()
    text = "".join(f"--- {node}\n" + (tmp_path / f"{node}.log").read_text()
                   for node in commands)
    assert all(p.returncode == 0 for p in procs), text[-8000:]
    return text


def run_job(cluster: MultiNodeCluster, args: list[str], env: dict, out: Path) -> str:
    job = cluster.sbatch("-o", str(out), *args, cwd=REPO, env=env)
    try:
        info = cluster.wait_state(job, DONE, RUN_TIMEOUT)
    except TimeoutError:
        cluster.run("scancel", job, check=False)
        raise
    text = out.read_text() if out.exists() else ""
    assert info["JobState"] == "COMPLETED", text[-8000:]
    return text


# -- tests --------------------------------------------------------------------------------------
def test_cluster_has_two_nodes_reachable_over_ssh_and_pdsh(cluster, env, tmp_path):
    """Fixture sanity: srun tasks land on node1 and node2 (as those hosts), node names resolve
    to the loopback aliases inside the nodes, and pdsh over ssh reaches both."""
    r = cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c",
                    'echo "$(hostname) $SLURM_NODEID $(getent hosts node1 | cut -d" " -f1)"',
                    env=env, cwd=tmp_path)
    assert sorted(r.stdout.splitlines()) == ["node1 0 127.0.0.2", "node2 1 127.0.0.2"]
    p = subprocess.run(cluster.node_cmd("node1", ["pdsh", "-R", "ssh", "-w", "node1,node2",
                                                  "hostname"], cwd=tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert sorted(p.stdout.splitlines()) == ["node1: node1", "node2: node2"], p.stderr


def test_train_sbatch_two_nodes(cluster, env, reference, tmp_path):
    run_dir = tmp_path / "run"
    text = run_job(cluster, ["--nodes=2", "--ntasks-per-node=2", "launch/slurm/train.sbatch",
                             f"run.dir={run_dir}", *TRAIN_ARGS], env, tmp_path / "job.out")
    assert "world 4 (slurm)" in text
    assert_two_ranks_per_node(text)
    assert_same_losses(run_dir, reference, text)


def test_torchrun_sbatch_two_nodes(cluster, env, reference, tmp_path):
    run_dir = tmp_path / "run"
    text = run_job(cluster, ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2",
                             "launch/slurm/train_torchrun.sbatch", f"run.dir={run_dir}",
                             *TRAIN_ARGS], {**env, "NPROC_PER_NODE": "2"}, tmp_path / "job.out")
    assert "world 4 (torchrun)" in text
    assert_two_ranks_per_node(text, rank0_on_node1=False)
    assert_same_losses(run_dir, reference, text)


def test_deepspeed_pdsh_over_ssh_two_nodes(cluster, env, reference, tmp_path):
    """From node1: `deepspeed --hostfile --launcher pdsh`; ssh starts the per-node launchers,
    which see only what .deepspeed_env (DS_ENV_FILE) exports, e.g. DS_ACCELERATOR=cpu."""
    run_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")
    ds_env = tmp_path / "ds_env"
    # pdsh's remote shell would expand this (`export K="$(...)"`): left out of the file
    made = subprocess.run([sys.executable, "-m", "swinv2_launch.deepspeed_env", "-o", str(ds_env)],
                          env={**env, "SWINV2_UNSAFE": "$(echo changed)"}, check=True,
                          capture_output=True, text=True)
    assert "DS_ACCELERATOR=cpu" in ds_env.read_text()
    assert "SWINV2_UNSAFE" not in ds_env.read_text() and "SWINV2_UNSAFE" in made.stderr
    cmd = [_bin("deepspeed"), "--hostfile", str(hostfile), "--launcher", "pdsh",
           "--master_addr", "node1", "--master_port", str(cluster.free_port()),
           "train/main.py", f"run.dir={run_dir}", *TRAIN_ARGS]
    text = run_on_nodes(cluster, {"node1": cmd}, {**env, "DS_ENV_FILE": str(ds_env)}, tmp_path)
    assert "world 4 (deepspeed)" in text
    assert_two_ranks_per_node(text)
    assert_same_losses(run_dir, reference, text)


def test_torchrun_two_agents_c10d(cluster, env, reference, tmp_path):
    run_dir = tmp_path / "run"
    endpoint = f"node1:{cluster.free_port()}"

    def agent(node: str) -> list[str]:
        return [_bin("torchrun"), "--nnodes", "2", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "mn-test",
                "--max-restarts", "0", "--local-addr", cluster.nodes[node],
                "train/main.py", f"run.dir={run_dir}", *TRAIN_ARGS]
    text = run_on_nodes(cluster, {n: agent(n) for n in cluster.nodes}, env, tmp_path)
    assert "world 4 (torchrun)" in text
    assert_two_ranks_per_node(text, rank0_on_node1=False)
    assert_same_losses(run_dir, reference, text)


def test_deepspeed_slurm_launcher_two_nodes(cluster, env, reference, tmp_path):
    """Inside a 2-node allocation: hostfile_from_slurm, then `deepspeed --launcher slurm`
    (srun -n 4 --nodes 2; the ranks map SLURM_PROCID/SLURM_LOCALID themselves)."""
    run_dir = tmp_path / "run"
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
set -euo pipefail
{sys.executable} -m swinv2_launch.hostfile_from_slurm -o {tmp_path}/hostfile
cat {tmp_path}/hostfile
{_bin("deepspeed")} --hostfile {tmp_path}/hostfile --launcher slurm --num_nodes 2 \\
    --no_ssh_check --master_addr node1 train/main.py run.dir={run_dir} {shlex.join(TRAIN_ARGS)}
""")
    text = run_job(cluster, ["--nodes=2", "--ntasks-per-node=2", str(script)], env,
                   tmp_path / "job.out")
    assert "node1 slots=2\nnode2 slots=2" in text
    assert "world 4 (slurm)" in text
    assert_two_ranks_per_node(text)
    assert_same_losses(run_dir, reference, text)


# -- losing a node ------------------------------------------------------------------------------
# train.dist_timeout_s, what bounds a collective whose peer went silent: well below the 23-40 s
# SLURM took here to mark a silent node DOWN (and cancel the step itself), so the tests can tell
# one from the other.
DIST_TIMEOUT_S = 10
CKPT_EVERY = 4
NODE_LOSS_STEPS = 24  # ~0.1-0.3 s per step: the kill lands well before the end


def node_loss_args(run_dir: Path) -> list[str]:
    """2 ranks (one per node) of the tiny model, a checkpoint every CKPT_EVERY steps, a short
    collective timeout."""
    args = [a for a in TRAIN_ARGS if not a.startswith("train.max_steps=")]
    return [f"run.dir={run_dir}", *args, f"train.max_steps={NODE_LOSS_STEPS}",
            f"train.ckpt_every={CKPT_EVERY}", f"train.dist_timeout_s={DIST_TIMEOUT_S}"]


def node_state(cluster: MultiNodeCluster, node: str) -> str:
    """sinfo's state of ``node`` (``down*``: down and not responding)."""
    return cluster.run("sinfo", "-h", "-N", "-n", node, "-o", "%T", check=False,
                       timeout=15).stdout.strip()


def ranks_on(cluster: MultiNodeCluster, node: str, run_dir: Path) -> list[int]:
    """PIDs of the trainer ranks of the run in ``run_dir`` on ``node`` (not srun)."""
    pids = []
    for pid in cluster.node_processes(node):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"swinv2_train.main" in argv and f"run.dir={run_dir}".encode() in argv
                and not argv[0].endswith(b"srun")):
            pids.append(pid)
    return pids


def lose_node2_mid_run(cluster: MultiNodeCluster, job: str, run_dir: Path,
                       silent: bool = False) -> int:
    """Once a checkpoint is committed, wait for a random later step and lose node2: SIGKILL
    every process on it, or with ``silent`` first SIGSTOP them (a node that loses power or
    network sends no reset: node1 must stop by the collective timeout) and SIGKILL them once
    node1's ranks are gone. Checks that node1's ranks stop by themselves within the collective
    timeout, before SLURM notices, and that SLURM then requeues the job. Returns the last
    committed step, where the job must resume."""
    seed = int(os.environ.get("SWINV2_NODE_LOSS_SEED", time.time_ns() % 10**6))
    target = random.Random(seed).randint(CKPT_EVERY + 1, NODE_LOSS_STEPS - 2 * CKPT_EVERY)
    print(f"node loss: seed {seed} (SWINV2_NODE_LOSS_SEED), lose node2 at step >= {target}")

    def latest() -> int:
        return max((s for s, _ in train_losses(run_dir)), default=0)
    wait_until(lambda: latest() >= target, RUN_TIMEOUT, f"step {target}", poll=0.05)
    survivors = ranks_on(cluster, "node1", run_dir)
    assert survivors and ranks_on(cluster, "node2", run_dir), "ranks not on both nodes"
    lost = (cluster.freeze_node if silent else cluster.kill_node)("node2")
    t_lost = time.monotonic()
    step_at_loss, committed = latest(), committed_steps(run_dir)
    print(f"node loss: {'stopped' if silent else 'killed'} {len(lost)} processes of node2 at "
          f"step {step_at_loss}; committed {committed}")
    assert committed and committed[-1] <= step_at_loss < NODE_LOSS_STEPS, (committed,
                                                                           step_at_loss)

    # No hang: node1's ranks fail at their next collective (a reset when node2's processes
    # die; the collective timeout when node2 is silent), before SLURM marks node2 DOWN (its
    # slurmd misses pings for SlurmdTimeout=10 s: ~25-40 s here) and cancels the step itself.
    wait_until(lambda: not any(_alive(p) for p in survivors), DIST_TIMEOUT_S + 10,
               "node1's ranks to exit", poll=0.1)
    stopped_after, state = time.monotonic() - t_lost, node_state(cluster, "node2")
    print(f"node loss: node1's ranks exited {stopped_after:.1f} s after node2 was lost "
          f"(train.dist_timeout_s={DIST_TIMEOUT_S}; node2 {state})")
    assert not state.startswith("down"), "SLURM, not the trainer, ended node1's ranks"
    if silent:
        assert stopped_after >= DIST_TIMEOUT_S - 1, "a silent peer cannot fail fast"
        cluster.kill_node("node2")

    # SLURM: node2 goes DOWN and the job, which has --requeue, is requeued (same id,
    # Restarts=1) rather than failed.
    wait_until(lambda: node_state(cluster, "node2").startswith("down"), 60, "node2 DOWN",
               poll=0.5)
    info = cluster.wait_state(job, {"PENDING", "REQUEUED", *DONE}, 30)
    print(f"node loss: node2 down after {time.monotonic() - t_lost:.1f} s; job {job} "
          f"{info['JobState']} Restarts={info.get('Restarts')} ({info.get('Reason')})")
    assert info["JobState"] in ("PENDING", "REQUEUED") and info.get("Restarts") == "1", info
    assert not ranks_on(cluster, "node1", run_dir)
    # The commit marker of a save that was under way at the loss may still have been written
    # (every rank's files were on disk when node2 stopped): the resume point is what is committed
    # now that every rank is gone, never older than what was committed at the loss.
    final = committed_steps(run_dir)
    assert final[-1] >= committed[-1] and final[-1] <= step_at_loss, (committed, final, step_at_loss)
    return final[-1]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def final_weights(run_dir: Path) -> dict:
    from swinv2_train.checkpoint import fp32_state_dict
    return fp32_state_dict(str(run_dir / "checkpoints" / f"step_{NODE_LOSS_STEPS:08d}"))


def test_node_loss_requeues_and_resumes_to_the_same_weights(cluster, env, tmp_path):
    """2 nodes x 1 rank; every process of node2 is SIGKILLed at a random step after the first
    checkpoint. node1's rank stops by itself, SLURM requeues the job, node2 comes back, and the
    job resumes from the last committed checkpoint and ends with the weights of an
    uninterrupted run of the same shape (bit for bit: same world size, so the same data per
    rank, the same per-rank RNG states from the checkpoint and the same gloo reductions)."""
    shape = ["--nodes=2", "--ntasks-per-node=1", "launch/slurm/train.sbatch"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run_job(cluster, [*shape, *node_loss_args(ref_dir)], env, tmp_path / "ref.out")

    out = tmp_path / "job.out"
    job = cluster.sbatch("-o", str(out), *shape, *node_loss_args(run_dir), cwd=REPO, env=env)
    try:
        resume_step = lose_node2_mid_run(cluster, job, run_dir)
        cluster.restart_node("node2")
        info = cluster.wait_state(job, DONE, RUN_TIMEOUT)
    finally:
        cluster.run("scancel", job, check=False)
        if "slurmd-node2" not in cluster.procs:
            cluster.restart_node("node2")
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-8000:])
    assert "restart 1 on node[1-2]" in text, text[-8000:]  # SLURM_RESTART_COUNT, both nodes
    assert re.search(rf"resumed from \S*step_{resume_step:08d} ", text), text[-8000:]
    assert committed_steps(run_dir)[-1] == NODE_LOSS_STEPS

    ref, got = final_weights(ref_dir), final_weights(run_dir)
    assert ref.keys() == got.keys()
    differ = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ[:5]}"
    assert dict(train_losses(run_dir)) == dict(train_losses(ref_dir))  # last value per step


def test_node_loss_job_comes_back_on_one_node(cluster, env, tmp_path):
    """``swinv2-submit nodes=1-2`` (sbatch ``--nodes=1-2``, one task per node): SLURM starts
    the job on both free nodes; node2 goes silent (then dies) and stays down, so the requeued
    job starts on node1 alone, as 1 rank, and must resume the 2-rank checkpoint (through
    DeepSpeed's universal format: train/checkpoint.py) and finish."""
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    cluster.wait_nodes_idle(list(cluster.nodes))  # both free: a job of another test may still end
    r = cluster.run(sys.executable, "-m", "swinv2_launch.submit", "nodes=1-2", "gpus_per_node=0",
                    f"output={out}", "--", *node_loss_args(run_dir), cwd=REPO, env=env)
    job = r.stdout.strip().splitlines()[-1]
    assert job.isdigit() and "#SBATCH --nodes=1-2\n" in r.stdout, r.stdout + r.stderr
    try:
        resume_step = lose_node2_mid_run(cluster, job, run_dir, silent=True)
        info = cluster.wait_state(job, DONE, RUN_TIMEOUT)
    finally:
        cluster.run("scancel", job, check=False)
        if "slurmd-node2" in cluster.procs:  # frozen or untouched: the test failed on the way
            cluster.kill_node("node2")
        cluster.restart_node("node2")  # whole again for the tests after this one
    text = out.read_text()
    assert "restart 0 on node[1-2]" in text and "restart 1 on node1:" in text, text[-8000:]
    assert "rank 0/1 on node1" in text, text[-8000:]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-8000:])
    assert "world 1 (slurm)" in text
    # 2 ranks -> 1: the ZeRO-1 optimizer state goes through DeepSpeed's universal format
    assert f"step_{resume_step:08d} to DeepSpeed's universal checkpoint format" in text
    assert re.search(rf"resumed from \S*step_{resume_step:08d} ", text), text[-8000:]
    assert committed_steps(run_dir)[-1] == NODE_LOSS_STEPS
    steps = [s for s, _ in train_losses(run_dir)]
    assert sorted(set(steps)) == list(range(1, NODE_LOSS_STEPS + 1)), steps

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
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multinode_cluster import MultiNodeCluster, have_multinode
from slurm_cluster import REPO, train_losses

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

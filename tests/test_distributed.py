"""train/distributed.py: argv stripping, launcher env discovery, real gloo collectives.

Multi-process cases start this file as a script (``python tests/test_distributed.py MODE``)
with the environment a launcher would give, and a real gloo process group on 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402

from swinv2_train import distributed as D  # noqa: E402

SLURM_CONF_MIN = """\
ClusterName=unit
SlurmctldHost=localhost
NodeName=node[01-04] NodeAddr=127.0.0.1 CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=node[01-04] Default=YES State=UP
"""


def _clean_env(**extra: str) -> dict[str, str]:
    """The parent's environment minus anything a launcher or SLURM would have set."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
            "TORCHELASTIC_RUN_ID", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def _run_worker(mode: str, env: dict, timeout: float = 120) -> dict:
    r = subprocess.run([sys.executable, __file__, mode], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _start_workers(mode: str, world: int, **extra: str) -> list[subprocess.Popen]:
    port = str(D.free_port())
    return [subprocess.Popen([sys.executable, __file__, mode], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=_clean_env(RANK=str(r), WORLD_SIZE=str(world),
                                            LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                            MASTER_PORT=port, **extra))
            for r in range(world)]


# ----------------------------------------------------------------------------- argv
@pytest.mark.parametrize("argv,expected_local_rank", [
    (["main.py", "--local_rank=3", "train.max_steps=2"], "3"),
    (["main.py", "train.max_steps=2", "--local_rank", "1"], "1"),
    (["main.py", "--local-rank=2", "train.max_steps=2"], "2"),
    (["main.py", "train.max_steps=2"], None),
])
def test_strip_launcher_args(monkeypatch, argv, expected_local_rank):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    out = D.strip_launcher_args(list(argv))
    assert out == ["main.py", "train.max_steps=2"]
    assert os.environ.get("LOCAL_RANK") == expected_local_rank


def test_strip_keeps_existing_local_rank_and_unrelated_args(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")
    argv = ["main.py", "run.name=--local_rank_fan", "--local_rank=1", "x=--local_rank"]
    assert D.strip_launcher_args(argv) == ["main.py", "run.name=--local_rank_fan",
                                           "x=--local_rank"]
    assert os.environ["LOCAL_RANK"] == "5"  # the launcher's env wins over the flag


@pytest.mark.parametrize("nodelist,first", [
    ("localhost", "localhost"),
    ("gpu[003-005,009],cpu1", "gpu003"),
    ("a1,a2", "a1"),
    ("n[7]", "n7"),
    ("rack[2-3]-n1", "rack2-n1"),
])
def test_first_host_fallback_parser(nodelist, first):
    assert D._expand_first_host(nodelist) == first


def test_slurm_port_is_stable_and_in_range():
    assert D.slurm_port("123") == D.slurm_port(123) == 20123
    assert all(20000 <= D.slurm_port(j) < 40000 for j in (0, 19999, 20000, 987654321))


# ----------------------------------------------------------------------------- env discovery
@pytest.mark.slow  # worker subprocesses (torch + DeepSpeed start-up each)
def test_single_process_defaults():
    out = _run_worker("env", _clean_env())
    assert out["rank"] == 0 and out["world_size"] == 1 and out["local_rank"] == 0
    assert out["launcher"] == "single" and out["backend"] == "gloo" and out["device"] == "cpu"
    assert out["MASTER_ADDR"] == "127.0.0.1" and int(out["MASTER_PORT"]) > 0
    assert out["DS_ACCELERATOR"] == "cpu" and out["is_main"]


@pytest.mark.slow  # worker subprocesses (torch + DeepSpeed start-up each)
def test_slurm_srun_task_env_mapping(tmp_path):
    """A one-task srun step: SLURM_* only, mapped to env:// (master via scontrol)."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(SLURM_CONF_MIN)
    env = _clean_env(SLURM_CONF=str(conf), SLURM_JOB_ID="4242", SLURM_PROCID="0",
                     SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1", SLURM_LOCALID="0",
                     SLURM_STEP_ID="0", SLURM_JOB_NODELIST="node[01-04]",
                     SLURM_STEP_NODELIST="node[01-04]")
    # node01 is not a real host: check the mapping only (the next test initialises).
    out = _run_worker("slurm-map", env)
    assert out["launcher"] == "slurm"
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"]) == ("0", "1", "0")
    assert out["MASTER_ADDR"] == "node01"
    assert out["MASTER_PORT"] == str(20000 + 4242)


@pytest.mark.slow  # worker subprocesses (torch + DeepSpeed start-up each)
def test_slurm_mapping_initialises_on_loopback(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text(SLURM_CONF_MIN.replace("node[01-04]", "localhost"))
    env = _clean_env(SLURM_CONF=str(conf), SLURM_JOB_ID=str(D.free_port()), SLURM_PROCID="0",
                     SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_STEP_ID="0",
                     SLURM_JOB_NODELIST="localhost")
    out = _run_worker("env", env)
    assert out["launcher"] == "slurm" and out["world_size"] == 1
    assert out["MASTER_ADDR"] == "localhost"


@pytest.mark.slow  # worker subprocesses (torch + DeepSpeed start-up each)
def test_batch_shell_is_not_a_task(tmp_path):
    """The sbatch shell has SLURM_PROCID/SLURM_NTASKS=2 but no step: one process, no hang."""
    env = _clean_env(SLURM_JOB_ID="7", SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0",
                     SLURM_JOB_NODELIST="localhost")
    out = _run_worker("env", env)
    assert out["launcher"] == "single" and out["world_size"] == 1


@pytest.mark.slow  # worker subprocesses (torch + DeepSpeed start-up each)
def test_torchrun_and_deepspeed_launcher_detection():
    out = _run_worker("env", _clean_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(D.free_port()),
                                        TORCHELASTIC_RUN_ID="abc", GROUP_RANK="0"))
    assert out["launcher"] == "torchrun"
    out = _run_worker("env", _clean_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(D.free_port()),
                                        CROSS_RANK="0", CROSS_SIZE="1", LOCAL_SIZE="1"))
    assert out["launcher"] == "deepspeed"


@pytest.mark.parametrize("environ,expected", [
    ({}, (0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4, 1)),               # torchrun / deepspeed
    ({"SLURM_PROCID": "2", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}, (2, 8, 0)),
    ({"SLURM_PROCID": "2", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "4",
      "SLURM_LOCALID": "2"}, (2, 4, 2)),                                             # the step's task count
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, (0, 1, 0)),                         # batch shell: one process
    ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_STEP_ID": "0"}, (1, 2, 0)),  # launcher wins
])
def test_launch_ranks_is_the_one_reader(environ, expected):
    assert D.launch_ranks(environ) == expected


def test_helpers_without_process_group():
    assert D.all_reduce_max(True) == 1.0 and D.all_reduce_max(2.5) == 2.5
    assert D.all_reduce_sum([1, 2.5]) == [1.0, 2.5] and D.all_reduce_max_list([3, 1]) == [3.0, 1.0]
    assert D.sum_counts({"b": 2, "a": 1}) == {"b": 2, "a": 1}
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    D.barrier()
    D.shutdown()


# ----------------------------------------------------------------------------- collectives
@pytest.mark.slow  # worker subprocesses (torch + DeepSpeed start-up each)
def test_two_process_gloo_collectives():
    procs = _start_workers("allreduce", 2)
    outs = []
    for p in procs:
        so, se = p.communicate(timeout=120)
        assert p.returncode == 0, so + se
        outs.append(json.loads(so.strip().splitlines()[-1]))
    for r, o in enumerate(outs):
        assert o["rank"] == r and o["world_size"] == 2
        assert o["max"] == 2.5            # max(1.0, 2.5)
        assert o["flag_any"] == 1.0       # only rank 1 had True
        assert o["flag_none"] == 0.0
        assert o["obj"] == {"from": 0, "tag": "global_step7"}
        assert o["sum"] == [2.0, 1.0]
        assert o["counts"] == {"bad_label": 2, "corrupt_image": 2}  # the union of keys, summed


@pytest.mark.slow  # worker subprocesses (torch + DeepSpeed start-up each)
def test_dead_peer_gives_bounded_error():
    """Rank 1 exits hard before the collective: rank 0 must fail, not hang."""
    procs = _start_workers("die", 2, SWINV2_DIST_TIMEOUT="20")
    so, se = procs[0].communicate(timeout=90)
    procs[1].communicate(timeout=30)
    assert procs[1].returncode == 9
    assert procs[0].returncode not in (0, None), so + se


# ----------------------------------------------------------------------------- worker side
def _worker(mode: str) -> None:
    import time
    if mode == "slurm-map":
        mapped = D._map_slurm_env()
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        out = {k: os.environ.get(k) for k in keys}
        out["launcher"] = D._detect_launcher(mapped, int(os.environ["WORLD_SIZE"]))
        print(json.dumps(out))
        return
    env = D.init_distributed()
    if mode == "env":
        out = {k: getattr(env, k) for k in ("rank", "world_size", "local_rank", "backend",
                                            "launcher", "is_main")}
        out["device"] = env.device.type
        for k in ("MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"):
            out[k] = os.environ.get(k)
    elif mode == "allreduce":
        out = {"rank": env.rank, "world_size": env.world_size, "launcher": env.launcher,
               "probe": os.environ.get("SWINV2_PROBE"),
               "max": D.all_reduce_max(1.0 if env.rank == 0 else 2.5),
               "flag_any": D.all_reduce_max(env.rank == 1),
               "flag_none": D.all_reduce_max(False),
               "obj": D.broadcast_object({"from": env.rank, "tag": "global_step7"}
                                         if env.rank == 0 else None),
               "sum": D.all_reduce_sum([1.0, env.rank]),
               "counts": D.sum_counts({"corrupt_image": 1 + env.rank} if env.rank else {"bad_label": 2})}
        D.barrier()
    elif mode == "die":
        D.barrier()
        if env.rank == 1:
            os._exit(9)
        time.sleep(0.5)
        t0 = time.monotonic()
        try:
            D.all_reduce_max(1.0)
            D.barrier()
        except Exception as e:  # the point: an exception, in bounded time
            print(f"rank0 collective failed after {time.monotonic() - t0:.1f}s: {e!r}",
                  file=sys.stderr)
            sys.exit(3)
        sys.exit(0)
    D.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_groups_created_later_get_the_collective_timeout():
    """ZeRO's data-parallel group is a new_group(): without bound_later_groups it would wait
    torch's 30-minute default on a silent peer instead of train.dist_timeout_s."""
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    saved = c10d.default_pg_timeout
    try:
        D.bound_later_groups(timedelta(seconds=7))
        assert c10d._get_default_timeout(c10d.Backend.GLOO) == timedelta(seconds=7)
    finally:
        c10d.default_pg_timeout = saved

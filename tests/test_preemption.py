"""train/preemption.py with real signals on a real 2-rank gloo group.

Workers are this file run as a script; the parent signals only one rank and checks that both
ranks stop after the same step, that a second signal during the "save" is absorbed, and that
everything exits 0.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from swinv2_train import distributed as D  # noqa: E402
from swinv2_train.preemption import PreemptionHandler  # noqa: E402


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def _wait_for(path: Path, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        time.sleep(0.02)
    raise TimeoutError(path)


@pytest.mark.slow  # two processes with a gloo group
def test_signal_on_one_rank_stops_all_at_same_step(tmp_path):
    port = str(D.free_port())
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    try:
        _wait_for(tmp_path / "step3.1")
        procs[1].send_signal(signal.SIGUSR1)          # only rank 1 is told
        _wait_for(tmp_path / "saving.1")
        for p in procs:                               # e.g. SLURM's SIGTERM after requeue
            p.send_signal(signal.SIGTERM)
        outs = []
        for p in procs:
            so, se = p.communicate(timeout=90)
            assert p.returncode == 0, so + se
            outs.append(json.loads(so.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert outs[0]["stop_step"] == outs[1]["stop_step"]
    assert outs[0]["stop_step"] >= 3 and outs[0]["stop_step"] < 190  # stopped early
    assert outs[1]["received"] == ["SIGUSR1", "SIGTERM"]
    assert outs[0]["received"] == ["SIGTERM"]          # rank 0 learnt it collectively
    assert all(o["saved"] for o in outs)               # SIGTERM did not interrupt the save


def test_no_signal_no_stop_and_requeue_noop(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    h = PreemptionHandler()
    try:
        assert h.should_stop() is False
        assert h.requeue() is False                    # not under SLURM: no-op
        h.request_stop()
        assert h.should_stop() is True and h.should_stop() is True
    finally:
        h.restore()


@pytest.mark.slow  # a real scontrol waits for its controller to time out (~9 s)
def test_requeue_failure_is_logged_not_raised(monkeypatch, tmp_path, caplog):
    # scontrol against a cluster that does not exist: must return False, not raise.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nSlurmctldPort=1\n"
                    "NodeName=localhost CPUs=1\nPartitionName=p Nodes=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    monkeypatch.setenv("SLURM_JOB_ID", "999999")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("SLURM_CONF_TIMEOUT", "1")
    h = PreemptionHandler(signals=())
    t0 = time.monotonic()
    assert h.requeue() is False
    assert time.monotonic() - t0 < 70
    assert "scontrol requeue 999999" in caplog.text


def _worker(outdir: Path) -> None:
    env = D.init_distributed()
    h = PreemptionHandler()
    stop_step = None
    for step in range(1, 200):
        time.sleep(0.05)                               # "train step"
        if step == 3:
            (outdir / f"step3.{env.rank}").write_text("")
        if h.should_stop():
            stop_step = step
            break
    saved = False
    if stop_step is not None:
        (outdir / f"saving.{env.rank}").write_text("")
        deadline = time.monotonic() + 3.0               # a "save" long enough to be hit
        while time.monotonic() < deadline and len(h.received) < (2 if env.rank == 1 else 1):
            time.sleep(0.01)
        D.barrier()
        saved = True
        h.requeue()
    D.shutdown()
    print(json.dumps({"rank": env.rank, "stop_step": stop_step, "saved": saved,
                      "received": h.received}))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))

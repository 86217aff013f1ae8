"""A real single-node SLURM cluster (munged + slurmctld + slurmd) on 127.0.0.1 for tests.

Everything lives under one directory below ``$TMPDIR/swinv2-slurm/``; daemons are stopped by
the PIDs this module started. Because a hard-killed pytest leaves daemons behind, ``start()``
first stops daemons recorded under *sibling* directories whose owning pytest process is dead
(never those of a live concurrent run: colleagues share this machine).

Ports default to 16817/16818 and fall back to free ports when taken; override with
``SWINV2_SLURMCTLD_PORT`` / ``SWINV2_SLURMD_PORT``. ``SWINV2_KEEP_SLURM_DIR=1`` keeps the
directory (daemon logs) after ``stop()``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(tempfile.gettempdir()) / "swinv2-slurm"
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order


def have_slurm() -> tuple[bool, str]:
    missing = [b for b in ("sbatch", "srun", "scontrol", "slurmctld", "slurmd", "munged",
                           "mungekey") if shutil.which(b) is None]
    return (not missing, f"SLURM/munge binaries missing: {missing}" if missing else "")


def _port_free(port: int, hosts: tuple[str, ...] = ("127.0.0.1",)) -> bool:
    """Free on every address in ``hosts`` (a listener on 0.0.0.0 makes each bind fail)."""
    for host in hosts:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _pick_port(env_name: str, default: int, taken: set[int],
               hosts: tuple[str, ...] = ("127.0.0.1",)) -> int:
    if os.environ.get(env_name):
        return int(os.environ[env_name])
    if default not in taken and _port_free(default, hosts):
        return default
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken and _port_free(port, hosts):
            return port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists"; treat it as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _stop_pid(pid: int, grace: float = 5.0) -> None:
    if not _alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cleanup_stale(root: Path = ROOT, daemons: tuple[str, ...] = DAEMONS) -> list[int]:
    """Stop daemons left by dead owners under ``root`` (``pids/<name>.pid`` for each name in
    ``daemons``, in that order); only PIDs whose command line still names that run's directory
    (PID reuse must not hit an unrelated process)."""
    stopped = []
    if not root.is_dir():
        return stopped
    for run in root.iterdir():
        owner = run / "owner.pid"
        try:
            if owner.exists() and _alive(int(owner.read_text())):
                continue
        except ValueError:
            pass
        for name in daemons:
            pf = run / "pids" / f"{name}.pid"
            try:
                pid = int(pf.read_text())
            except (OSError, ValueError):
                continue
            if str(run) in _cmdline(pid):
                _stop_pid(pid)
                stopped.append(pid)
        shutil.rmtree(run, ignore_errors=True)
    return stopped


# Plugins and policies both test clusters share: no cgroups, accounting or MPI; a node that comes
# back is usable at once (ReturnToService=2).
COMMON_SLURM_CONF = """\
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
"""

SLURM_CONF = """\
ClusterName=swinv2test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/pids/slurmctld.pid
SlurmdPidFile={base}/pids/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
{common}SchedulerParameters=batch_sched_delay=0
MailProg=/bin/true
CommunicationParameters=NoInAddrAny
KillWait=10
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class SlurmCluster:
    STOP_ORDER = DAEMONS

    def __init__(self, cpus: int = 2, root: Path = ROOT):
        self.cpus = cpus
        root.mkdir(parents=True, exist_ok=True)
        self.base = Path(tempfile.mkdtemp(prefix="c-", dir=root))
        # munged wants execute permission for all on every directory above its socket.
        os.chmod(root, 0o755)
        os.chmod(self.base, 0o755)
        self.conf = self.base / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        # Written at once so a concurrent cleanup_stale() never takes this run for stale.
        (self.base / "owner.pid").write_text(str(os.getpid()))

    # -- environment for client commands (sbatch, scontrol, ...) and jobs --------------------
    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw):
        return subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True,
                              text=True, check=check, timeout=timeout, **kw)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.base / "log" / f"{name}.out", "wb")
        # New session: a Ctrl-C to pytest must not reach the daemons before teardown runs.
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        (self.base / "pids" / f"{name}.pid").write_text(str(self.procs[name].pid))

    def _wait(self, what: str, ok, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited {p.returncode} while waiting for {what}:"
                                       f"\n{self.logs()}")
            if ok():
                return
            time.sleep(0.1)
        raise TimeoutError(f"{what} not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted((self.base / "log").glob("*")):
            out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def start(self) -> "SlurmCluster":
        cleanup_stale(self.base.parent)
        for d in ("munge/run", "state", "spool", "pids", "log"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self._start_munge()

        self.ctld_port = _pick_port("SWINV2_SLURMCTLD_PORT", 16817, set())
        self.slurmd_port = _pick_port("SWINV2_SLURMD_PORT", 16818, {self.ctld_port})
        self.conf.write_text(SLURM_CONF.format(common=COMMON_SLURM_CONF, base=self.base,
                                               ctld_port=self.ctld_port, slurmd_port=self.slurmd_port,
                                               cpus=self.cpus, munge_socket=self.munge_socket))
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
        self.wait_nodes_idle(["localhost"])
        return self

    def wait_nodes_idle(self, nodes: list[str], timeout: float = 30) -> None:
        def idle():
            r = self.run("sinfo", "-h", "-N", "-n", ",".join(nodes), "-o", "%T", check=False,
                         timeout=10)
            states = r.stdout.split()
            return r.returncode == 0 and len(states) == len(nodes) and set(states) == {"idle"}
        self._wait("slurm node(s) idle", idle, timeout)

    def _start_munge(self) -> None:
        os.chmod(self.base / "munge" / "run", 0o755)  # munged insists on it
        self.munge_socket = self.base / "munge" / "run" / "munge.socket"
        key = self.base / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True,
                       capture_output=True)
        os.chmod(key, 0o600)
        self._spawn("munged", ["munged", "--foreground", f"--socket={self.munge_socket}",
                               f"--key-file={key}",
                               f"--pid-file={self.base}/munge/munged.pid",
                               f"--seed-file={self.base}/munge/munged.seed",
                               f"--log-file={self.base}/log/munged.log"])

        def munge_ok():
            enc = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)],
                                 capture_output=True)
            return enc.returncode == 0 and subprocess.run(
                ["unmunge", "-S", str(self.munge_socket)], input=enc.stdout,
                capture_output=True).returncode == 0
        self._wait("munged", munge_ok)

    def stop(self) -> None:
        if self.conf.exists() and "slurmctld" in self.procs:
            self.run("scancel", "--full", "-u", "root", check=False, timeout=15)
        for name in self.STOP_ORDER:
            p = self.procs.get(name)
            if p is not None:
                _stop_pid(p.pid)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self._stop_leftovers()
        (self.base / "owner.pid").unlink(missing_ok=True)
        if not os.environ.get("SWINV2_KEEP_SLURM_DIR"):  # keep daemon logs for debugging
            shutil.rmtree(self.base, ignore_errors=True)

    def _stop_leftovers(self) -> None:
        # Job processes slurmd started run in their own sessions; anything still naming our
        # directory is ours (e.g. a task that ignored SIGTERM).
        for pid_dir in Path("/proc").iterdir():
            if pid_dir.name.isdigit() and int(pid_dir.name) != os.getpid():
                if str(self.base) in _cmdline(int(pid_dir.name)):
                    _stop_pid(int(pid_dir.name), grace=1)

    # -- job helpers -------------------------------------------------------------------------
    def sbatch(self, *args: str, cwd: str | os.PathLike | None = None,
               env: dict | None = None) -> str:
        r = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env or self.env)
        return r.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        r = self.run("scontrol", "show", "job", "-o", job_id, check=False, timeout=15)
        info = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def job_state(self, job_id: str) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll ``scontrol show job`` (much faster than ``sbatch --wait``)."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {info}\n"
                           f"{self.logs()}")


# -- trainer helpers shared by the launch tests ----------------------------------------------
REPO = Path(__file__).resolve().parents[1]

# The smallest run of the real trainer: the default tiny model on the built-in synthetic data,
# 2 images per rank, no W&B/TensorBoard/probes/export, no data workers.
TINY_TRAIN = ["logger=none", "train.batch_size=4", "train.amp_every=0", "train.log_every=1",
              "run.export_official=false", "data.num_workers=0", "data.shuffle_buffer=0",
              "train.eval_batch_size=32", "train.progress=lines"]


def train_losses(run_dir: str | os.PathLike) -> list[tuple[int, float]]:
    """(step, train/loss) in file order from metrics.jsonl (duplicates kept on purpose)."""
    import json
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line being written right now
            continue
        if "train/loss" in rec:
            out.append((int(rec["step"]), float(rec["train/loss"])))
    return out


def committed_steps(run_dir: str | os.PathLike) -> list[int]:
    ckpts = Path(run_dir) / "checkpoints"
    return sorted(int(d.name.split("_")[1]) for d in ckpts.glob("step_*")
                  if (d / "COMMITTED").exists()) if ckpts.is_dir() else []


def wait_until(pred, timeout: float, what: str, poll: float = 0.2, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"process {p.args} exited {p.returncode} while waiting "
                                   f"for {what}")
        time.sleep(poll)
    raise TimeoutError(f"{what} not reached after {timeout}s")

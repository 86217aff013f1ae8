"""A real two-node cluster on one machine for tests: SLURM (munged, slurmctld, one slurmd per
node) plus one sshd per node, so pdsh/ssh launches work as on a real cluster.

A node is a loopback alias plus its own UTS and mount namespace (no network namespace):

* ``ctl`` = 127.0.0.1 (slurmctld), ``node1`` = 127.0.0.2, ``node2`` = 127.0.0.3.
* Each daemon starts as ``unshare --uts --mount --propagation private -- node-enter NAME CMD``;
  ``node-enter`` sets the host name and bind-mounts this cluster's hosts file and ssh_config
  over /etc/hosts and /etc/ssh/ssh_config, so only processes inside see them: the machine's
  /etc and ~ stay untouched. Job tasks, ssh sessions and :meth:`MultiNodeCluster.node_cmd`
  commands inherit the namespace: ``hostname`` is node1/node2, node names resolve to their
  addresses, and gloo binds 127.0.0.2/127.0.0.3.
* munge key, ssh host/user keys, known_hosts, logs and state all live under one temp directory
  below ``$TMPDIR/swinv2-multinode/``.

Teardown stops the daemons by the PIDs started here (slurmctld first: it takes 10 s to exit when
its slurmds die before it), then SIGKILLs whatever is still inside this cluster's namespaces
(tasks, ssh sessions, launchers). A hard-killed pytest leaves all that behind: ``start()`` first
does the same for sibling directories whose owning pytest process is dead.

A node can be lost and brought back: :meth:`MultiNodeCluster.kill_node` SIGKILLs every process
of the node at once (slurmd, sshd, slurmstepd, tasks, ssh sessions), as a power loss would;
:meth:`MultiNodeCluster.restart_node` starts its daemons again in fresh namespaces, as a reboot.

SLURM helpers (``sbatch``, ``wait_state``, ...) come from :class:`slurm_cluster.SlurmCluster`.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from slurm_cluster import (COMMON_SLURM_CONF, SlurmCluster, _alive, _pick_port, cleanup_stale, have_slurm)

ROOT = Path(tempfile.gettempdir()) / "swinv2-multinode"
CTL = ("ctl", "127.0.0.1")
NODES = {"node1": "127.0.0.2", "node2": "127.0.0.3"}
LOOPBACKS = (CTL[1], *NODES.values())
SSHD = "/usr/sbin/sshd"
# slurmctld first (see the module docstring); munged last, the slurm daemons need it to the end.
DAEMONS = ("slurmctld", *(f"slurmd-{n}" for n in NODES), *(f"sshd-{n}" for n in NODES), "munged")
NAMESPACED = ("slurmctld", *(f"slurmd-{n}" for n in NODES), *(f"sshd-{n}" for n in NODES))


def have_multinode() -> tuple[bool, str]:
    """(True, "") when this machine can host the cluster, else (False, why)."""
    ok, why = have_slurm()
    if not ok:
        return ok, why
    missing = [b for b in ("unshare", "nsenter", "ssh", "ssh-keygen", "pdsh", "hostname", "mount")
               if shutil.which(b) is None]
    if not os.path.exists(SSHD):
        missing.append(SSHD)
    if missing:
        return False, f"multi-node cluster binaries missing: {missing}"
    if os.geteuid() != 0:
        return False, "the multi-node cluster needs root (namespaces, bind mounts, sshd)"
    probe = subprocess.run(["unshare", "--uts", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return False, f"cannot create UTS/mount namespaces: {probe.stderr.strip()}"
    return True, ""


# -- files -------------------------------------------------------------------------------------
SLURM_CONF = """\
ClusterName=swinv2mn
SlurmctldHost={ctl_name}({ctl_addr})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/state/d-%n
SlurmctldPidFile={base}/state/slurmctld.pid
SlurmdPidFile={base}/state/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
{common}SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
MailProg=/bin/true
# Not NoInAddrAny: slurmstepd connects back to srun at the source address of srun's request
# (always 127.0.0.1), and NoInAddrAny would make srun listen on 127.0.0.x only. slurmd listens on
# 0.0.0.0 with one port per node; only 127.x peers ever connect.
CommunicationParameters=NoCtldInAddrAny
SlurmdTimeout=10
KillWait=2
MinJobAge=300
{node_lines}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
NODE_LINE = ("NodeName={name} NodeAddr={addr} Port={port} CPUs={cpus} Sockets=1 "
             "CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=1024 State=UNKNOWN")

NODE_ENTER = """\
#!/bin/sh
# node-enter NAME CMD...: run CMD as host NAME. Only inside a fresh UTS + private mount namespace
# (unshare --uts --mount --propagation private): the bind mounts hide the machine's files there.
set -e
name=$1
shift
hostname "$name"
mount --bind {base}/etc/hosts /etc/hosts
mount --bind {base}/etc/ssh_config /etc/ssh/ssh_config
exec "$@"
"""

SSHD_CONFIG = """\
HostKey {base}/ssh/host_key
AuthorizedKeysFile {base}/ssh/authorized_keys
PidFile none
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PrintMotd no
LogLevel ERROR
"""

# What ssh (and so pdsh and DeepSpeed's ssh check) sees inside a node namespace.
SSH_CONFIG = """\
Host {hosts}
    Port {port}
    User root
    IdentityFile {base}/ssh/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile {base}/ssh/known_hosts
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    UpdateHostKeys no
    CheckHostIP no
    BatchMode yes
    LogLevel ERROR
"""


def _hosts_file() -> str:
    lines = [f"{CTL[1]} localhost {CTL[0]}"] + [f"{a} {n}" for n, a in NODES.items()]
    return "\n".join(lines) + "\n"


def _uts_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None


def kill_namespaces(namespaces: set[str]) -> list[int]:
    """SIGKILL every process whose UTS namespace is one of ``namespaces`` (``uts:[inode]``),
    never in this process's own namespace (the machine's: a daemon not yet in its own one)."""
    namespaces = set(namespaces) - {_uts_ns(os.getpid()), None}
    killed = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        if _uts_ns(int(pid_dir.name)) in namespaces:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
                killed.append(int(pid_dir.name))
            except ProcessLookupError:
                pass
    return killed


def cleanup_stale_namespaces(root: Path = ROOT) -> None:
    """Kill what still runs in the namespaces of clusters whose pytest died. A namespace's inode
    can be reused once the namespace is gone, so a recorded one only counts as that cluster's
    while some process in it names the run's directory (a daemon's command line, or a task's
    SLURM_CONF)."""
    if not root.is_dir():
        return
    for run in root.iterdir():
        owner, ns_file = run / "owner.pid", run / "uts_namespaces"
        try:
            if owner.exists() and _alive(int(owner.read_text())):
                continue
            recorded = set(ns_file.read_text().split())
        except (OSError, ValueError):
            continue
        ours = set()
        for pid_dir in Path("/proc").iterdir():
            if pid_dir.name.isdigit() and _uts_ns(int(pid_dir.name)) in recorded:
                if str(run) in _read(pid_dir / "cmdline") + _read(pid_dir / "environ"):
                    ours.add(_uts_ns(int(pid_dir.name)))
        kill_namespaces(ours)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class MultiNodeCluster(SlurmCluster):
    """``MultiNodeCluster().start()``; ``stop()`` in a ``finally``. Client commands (sbatch,
    scontrol, ...) run on the machine with ``self.env``; anything that must run *on* a node
    (torchrun agents, a pdsh-launching deepspeed) goes through :meth:`node_cmd`."""

    STOP_ORDER = DAEMONS

    def __init__(self, cpus_per_node: int = 2, root: Path = ROOT):
        super().__init__(cpus=cpus_per_node, root=root)
        self.nodes = dict(NODES)
        self.made_run_sshd = False
        self.namespaces: set[str] = set()
        self.node_namespaces: dict[str, set[str]] = {}  # node -> its daemons' UTS namespaces

    # -- running things on a node ----------------------------------------------------------
    def node_pid(self, node: str) -> int:
        """A process inside ``node``'s namespaces (its slurmd)."""
        return self.procs[f"slurmd-{node}"].pid

    def node_cmd(self, node: str, cmd: list[str], cwd: str | os.PathLike) -> list[str]:
        """``cmd`` prefixed to run inside ``node``'s namespaces, in directory ``cwd``."""
        return ["nsenter", "-t", str(self.node_pid(node)), "--uts", "--mount",
                f"--wd={cwd}", "--", *cmd]

    def free_port(self) -> int:
        """A port free on every address of the cluster (rendezvous, master ports)."""
        return _pick_port("", 0, {0}, LOOPBACKS)

    def kill_strays(self) -> list[int]:
        """SIGKILL what a failed test left on the nodes (ranks, launchers, ssh sessions); the
        daemons and SLURM's own processes stay (jobs are scancel's business)."""
        daemons = {p.pid for p in self.procs.values()}
        strays = set()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) in daemons:
                continue
            if (_uts_ns(int(pid_dir.name)) in self.namespaces
                    and not _read(pid_dir / "comm").startswith("slurm")):
                strays.add(int(pid_dir.name))
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return sorted(strays)

    def node_processes(self, node: str) -> list[int]:
        """PIDs of everything running on ``node`` (inside its daemons' namespaces)."""
        spaces = self.node_namespaces.get(node, set())
        return sorted(int(d.name) for d in Path("/proc").iterdir()
                      if d.name.isdigit() and _uts_ns(int(d.name)) in spaces)

    # -- losing a node -------------------------------------------------------------------------
    def kill_node(self, node: str) -> list[int]:
        """Lose ``node``: SIGKILL every process on it (slurmd, sshd, slurmstepd, tasks, ssh
        sessions), so none can run a handler or tell anyone. SLURM finds out the way it would on
        a real cluster: slurmd stops answering pings. Returns the PIDs killed."""
        daemons = [self.procs.pop(f"{kind}-{node}") for kind in ("slurmd", "sshd")]
        spaces = self.node_namespaces[node]
        killed: list[int] = []
        for _ in range(100):  # again until nothing is left: a process may fork while we kill
            pids = kill_namespaces(spaces)
            if not pids:
                break
            killed += pids
            time.sleep(0.02)
        for p in daemons:  # reap them: the cluster no longer counts them as its daemons
            p.wait(timeout=10)
        left = self.node_processes(node)
        assert not left, f"{node}: processes survived SIGKILL: {left}"
        return sorted(set(killed))

    def freeze_node(self, node: str) -> list[int]:
        """Make ``node`` go silent: SIGSTOP every process on it. A lost node seen from its
        peers: a killed process's sockets are closed by this machine's (shared) kernel, so its
        peers get a reset at once, but a node that loses power or network sends nothing, and a
        peer waiting on it stops only by its own timeout. :meth:`kill_node` it afterwards."""
        stopped: set[int] = set()
        for _ in range(3):  # again: a process may have forked meanwhile
            for pid in set(self.node_processes(node)) - stopped:
                try:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.add(pid)
                except ProcessLookupError:
                    pass
        return sorted(stopped)

    def restart_node(self, node: str, timeout: float = 90) -> None:
        """Bring ``node`` back after :meth:`kill_node`, as after a reboot: sshd and slurmd in
        new namespaces. Returns once SLURM has the node idle again and ssh from the other nodes
        reaches it. ReturnToService=2 takes a node that was DOWN for not responding back as soon
        as its slurmd registers; a node killed while SLURM was ending a job on it, before it was
        marked DOWN, stays COMPLETING for about a minute (56 s seen) first."""
        self._start_sshd(node)
        self._spawn_on(f"slurmd-{node}", node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._record_namespaces()
        self.wait_nodes_idle([node], timeout)
        for src in self.nodes:
            self._wait(f"ssh {src} -> {node}", lambda s=src: self.ssh_ok(s, node), 20)

    def ssh_ok(self, src: str, dst: str) -> bool:
        r = subprocess.run(self.node_cmd(src, ["ssh", dst, "hostname"], cwd="/"),
                           capture_output=True, text=True, timeout=20)
        return r.returncode == 0 and r.stdout.strip() == dst

    # -- start -------------------------------------------------------------------------------
    def start(self) -> "MultiNodeCluster":
        cleanup_stale_namespaces(self.base.parent)
        cleanup_stale(self.base.parent, DAEMONS)
        for d in ("munge/run", "state", "pids", "log", "etc", "ssh", "bin"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._pick_ports()
        self._write_node_files()
        self._write_slurm_conf()
        self._start_sshds()
        self._spawn_on("slurmctld", CTL[0], ["slurmctld", "-D", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn_on(f"slurmd-{node}", node,
                           ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._record_namespaces()
        self.wait_nodes_idle(list(self.nodes))
        for src in self.nodes:
            for dst in self.nodes:
                self._wait(f"ssh {src} -> {dst}", lambda s=src, d=dst: self.ssh_ok(s, d), 20)
        return self

    def _pick_ports(self) -> None:
        """Ports free on every loopback address (slurmd listens on 0.0.0.0)."""
        taken: set[int] = set()

        def pick(env_name: str, default: int) -> int:
            port = _pick_port(env_name, default, taken, LOOPBACKS)
            taken.add(port)
            return port
        self.ctld_port = pick("SWINV2_MN_SLURMCTLD_PORT", 16917)
        self.slurmd_ports = {node: pick(f"SWINV2_MN_SLURMD_PORT_{i + 1}", 16918 + i)
                             for i, node in enumerate(self.nodes)}
        # one port for both sshds: they listen on different addresses
        self.ssh_port = pick("SWINV2_MN_SSH_PORT", 22022)

    def _write_node_files(self) -> None:
        base = self.base
        (base / "etc" / "hosts").write_text(_hosts_file())
        names = " ".join([*self.nodes, *self.nodes.values()])
        (base / "etc" / "ssh_config").write_text(
            SSH_CONFIG.format(hosts=names, port=self.ssh_port, base=base))
        (base / "etc" / "sshd_config").write_text(SSHD_CONFIG.format(base=base))
        enter = base / "bin" / "node-enter"
        enter.write_text(NODE_ENTER.format(base=base))
        enter.chmod(0o755)
        for key in ("host_key", "id_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"swinv2-{key}",
                            "-f", str(base / "ssh" / key)], check=True, capture_output=True)
        shutil.copy(base / "ssh" / "id_ed25519.pub", base / "ssh" / "authorized_keys")
        host_pub = " ".join((base / "ssh" / "host_key.pub").read_text().split()[:2])
        known = ",".join(f"[{h}]:{self.ssh_port}" for h in names.split())
        (base / "ssh" / "known_hosts").write_text(f"{known} {host_pub}\n")

    def _write_slurm_conf(self) -> None:
        node_lines = "\n".join(NODE_LINE.format(name=n, addr=a, port=self.slurmd_ports[n],
                                                 cpus=self.cpus) for n, a in self.nodes.items())
        self.conf.write_text(SLURM_CONF.format(
            common=COMMON_SLURM_CONF, base=self.base, ctl_name=CTL[0], ctl_addr=CTL[1], ctld_port=self.ctld_port,
            munge_socket=self.munge_socket, node_lines=node_lines,
            node_names=",".join(self.nodes)))

    def _spawn_on(self, name: str, host: str, cmd: list[str]) -> None:
        """Start daemon ``name`` as host ``host`` in a UTS + mount namespace of its own."""
        self._spawn(name, ["unshare", "--uts", "--mount", "--propagation", "private", "--",
                           str(self.base / "bin" / "node-enter"), host, *cmd])

    def _start_sshds(self) -> None:
        # sshd insists on its privilege separation directory; remove it again only if we made it.
        if not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755)
            self.made_run_sshd = True
        for node in self.nodes:
            self._start_sshd(node)

    def _start_sshd(self, node: str) -> None:
        self._spawn_on(f"sshd-{node}", node,
                       [SSHD, "-D", "-e", "-f", str(self.base / "etc" / "sshd_config"),
                        "-o", f"ListenAddress={self.nodes[node]}:{self.ssh_port}"])

    def _record_namespaces(self) -> None:
        """The daemons' UTS namespaces, for teardown (also by a later run: a hard-killed pytest
        leaves them behind) and per node (:meth:`kill_node`). Waits for each ``unshare`` to have
        entered its namespace. Earlier ones stay recorded: a restarted node gets new ones."""
        mine = _uts_ns(os.getpid())

        def entered():
            spaces = {name: _uts_ns(self.procs[name].pid) for name in NAMESPACED}
            return None not in spaces.values() and mine not in spaces.values()
        self._wait("daemons in their namespaces", entered, 10)
        self.namespaces |= {_uts_ns(self.procs[name].pid) for name in NAMESPACED}
        self.node_namespaces = {node: {_uts_ns(self.procs[f"{kind}-{node}"].pid)
                                       for kind in ("slurmd", "sshd")} for node in self.nodes}
        (self.base / "uts_namespaces").write_text("\n".join(sorted(self.namespaces)) + "\n")

    # -- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        # Also after a failed start(): note the namespaces of whatever daemons came up.
        self.namespaces |= {_uts_ns(self.procs[n].pid) for n in NAMESPACED
                            if n in self.procs} - {None}
        super().stop()

    def _stop_leftovers(self) -> None:
        # Tasks, ssh sessions, launchers and agents run inside the nodes' namespaces (with the
        # daemons gone, nothing else of ours is in them): SIGKILL, no handler gets to run.
        kill_namespaces(self.namespaces)
        super()._stop_leftovers()
        if self.made_run_sshd:
            try:
                os.rmdir("/run/sshd")
            except OSError:
                pass

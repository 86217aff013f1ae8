"""Graceful preemption: signal -> flag -> collective decision at a step boundary.

Pattern (as in Megatron's DistributedSignalHandler): the signal handler does nothing but set a
flag, so a signal can never interrupt a collective or a half-written checkpoint. Every rank
calls :meth:`PreemptionHandler.should_stop` at each step boundary; it is an all-reduce MAX of
the local flags, so when SLURM signals only some ranks (or signals them at slightly different
times) all ranks still stop after the *same* step.

Usage::

    preempt = PreemptionHandler()
    for step in ...:
        train_step()
        if preempt.should_stop():      # every rank, every step
            save_checkpoint()          # every rank, commit marker last
            preempt.requeue()          # rank 0: scontrol requeue $SLURM_JOB_ID
            return 0                   # exit cleanly

Exit-code semantics under SLURM with ``#SBATCH --requeue``:

* ``scontrol requeue <jobid>`` ends the running allocation and puts the *same job id* back to
  PENDING (``SLURM_RESTART_COUNT`` increments). SLURM then terminates whatever is still running
  (SIGTERM to the tasks, SIGKILL after ``KillWait``), so the save must be complete *before*
  requeue() is called; SIGTERMs arriving after the stop decision are absorbed by this handler.
* The exit status of that incarnation is not what decides requeueing (the explicit requeue
  does), but exit 0 keeps the logs readable; a non-zero exit without a requeue leaves the job
  FAILED, which is what a crash should do.
* Without SLURM (torchrun, deepspeed launcher, plain python) requeue() is a no-op and the
  process simply exits 0 after the checkpoint; restarting the same command auto-resumes.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Iterable

from . import distributed

log = logging.getLogger(__name__)


class PreemptionHandler:
    def __init__(self, signals: Iterable[int] = (signal.SIGUSR1, signal.SIGTERM)):
        self.signals = tuple(signals)
        self._flag = False
        self._decided = False
        self._received: list[str] = []
        self._previous: dict[int, object] = {}
        # signal.signal only works in the main thread; elsewhere (e.g. a test harness thread)
        # the handler still works as a manually settable flag.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        first = not self._received
        self._received.append(name)
        self._flag = True
        # os.write, not logging: a handler that re-enters logging's lock could deadlock.
        if first:
            os.write(2, f"[preemption] rank {os.environ.get('RANK', '?')} got {name}: "
                        "will checkpoint and stop at the next step boundary\n".encode())
        elif self._decided:
            os.write(2, f"[preemption] {name} absorbed: checkpoint in progress\n".encode())

    @property
    def received(self) -> list[str]:
        """Names of the signals this process received (local, not collective)."""
        return list(self._received)

    @property
    def local_flag(self) -> bool:
        return self._flag

    def request_stop(self) -> None:
        """Set the local flag programmatically (e.g. from a time budget)."""
        self._flag = True

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank was signalled. Call on all ranks at every
        step boundary. Once True it stays True without further communication."""
        if self._decided:
            return True
        if distributed.all_reduce_max(self._flag) > 0:
            self._decided = True
        return self._decided

    def requeue(self) -> bool:
        """Rank 0 under SLURM: ``scontrol requeue $SLURM_JOB_ID``. Logs, never raises.
        Returns True if a requeue was issued successfully (False elsewhere / on error).
        Call it on every rank after the checkpoint is committed, right before exiting: from
        here on the handled signals are ignored."""
        self._ignore_further_signals()
        job_id = os.environ.get("SLURM_JOB_ID")
        env = distributed.get_env()
        rank = env.rank if env is not None else int(os.environ.get("RANK", "0"))
        if not job_id or rank != 0:
            return False
        try:
            r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                               timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            log.error("scontrol requeue %s failed: %s", job_id, e)
            return False
        if r.returncode != 0:
            log.error("scontrol requeue %s exited %d: %s", job_id, r.returncode,
                      (r.stderr or r.stdout).strip())
            return False
        log.warning("requeued SLURM job %s; it will resume from the checkpoint", job_id)
        return True

    def _ignore_further_signals(self) -> None:
        # requeue() is the last act before exiting. SLURM follows a requeue with SIGTERM, and
        # interpreter shutdown resets Python-level handlers to SIG_DFL, so a late SIGTERM would
        # still kill the (already checkpointed) process with 143; SIG_IGN survives shutdown.
        if threading.current_thread() is threading.main_thread():
            for sig in self._previous:
                signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        """Reinstall the previous handlers (tests, or code that outlives the training loop)."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


def restart_count() -> int:
    """How many times SLURM has requeued this job (0 outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


__all__ = ["PreemptionHandler", "restart_count"]

"""The Trainer: a DeepSpeed engine, a batch stream, a task, a checkpoint manager and a logger,
put together by `build_trainer` and driven by `Trainer.fit`, a loop of small parts:

    while step < total:
        if preempt.should_stop(): save; requeue; stop     # collective, every step boundary
        result = train_step()                           # accum micro-batches -> one update
        nonfinite.observe(step, result)                 # skip / fail policy (raises NonFiniteError)
        ema.update() if the step was applied            # train.ema_decay (swinv2_train.ema)
        log / evaluate / save when due                  # Cadence; the end of the run is Budget's

A step reads nothing from the device of its own: its losses stay there until a log step (or a
step DeepSpeed refused); the host syncs left per step are listed in docs/DESIGN.md and counted
by tests/test_host_syncs.py. Log steps add time, ETA, TFLOP/s and MFU (swinv2_train.throughput);
train.profile_steps traces steps (swinv2_train.profiling).

The policies (non-finite steps, cadences, the step budget, metric reductions over ranks) are plain
functions and small classes with unit tests (tests/test_trainer_units.py); they need no engine.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from tqdm import tqdm

import swinv2
from . import distributed
from .amplitudes import amplitude_figure, amplitude_metrics
from .checkpoint import CheckpointManager, set_rng_state
from .data import TrainStream, saved_position
from .ema import ModelEma, build_ema, evaluate_ema
from .errors import NonFiniteError, ResumeMismatchError
from .metrics import NullLogger, read_jsonl
from .parallelize import parallelize
from .profiling import StepProfiler
from .rng import seed_rank_streams
from .rundir import AMPLITUDE_IMAGE, EMA_FILE, RunDir, best_of
from .tasks import Task, reduced_train_metrics, task_class
from .throughput import Meter, device_synchronize, format_duration, macs_per_image, mfu_pct, model_tflops, peak_tflops

log = logging.getLogger("train")

WAY_OUT = ("lower optim.lr or raise sched.warmup_steps (or try train.precision=fp32); the same "
           "command then resumes from the last checkpoint")


# ----------------------------------------------------------------------------- policies
@dataclass
class StepResult:
    """A step's values on the host (read at log steps, or when the step was not applied)."""

    loss: float        # mean over micro-batches and ranks (NaN when any rank saw a bad loss)
    bad_loss: bool     # a non-finite loss on any rank
    grad_norm: float
    applied: bool      # the engine applied the update
    time: float        # this rank's seconds per step (at log steps: the mean since the last one)
    wait: float        # ... of which waiting for data


@dataclass
class DeviceStep:
    """One optimizer step as the device left it: its losses not read yet (train_step makes no
    host read of its own; `resolve` reads them, at log steps or for the non-finite policy)."""

    loss_sum: torch.Tensor  # this rank's finite micro-batch losses, summed on the device
    bad: torch.Tensor       # the number of its non-finite ones
    grad_norm: Any          # DeepSpeed's (a float, or a device tensor), None when not computed
    applied: bool           # DeepSpeed's overflow check, agreed over ranks (its own host read)
    losses: int             # micro-batches x ranks
    time: float             # this rank's host seconds for the step (the device may still be busy)
    wait: float             # ... of which waiting for data
    _resolved: Optional[StepResult] = None

    def resolve(self) -> StepResult:
        """The host values, once (collective: one all-reduce of the loss sum and the bad count)."""
        if self._resolved is None:
            total, bad = distributed.all_reduce_sum(torch.stack([self.loss_sum, self.bad]).tolist())
            gn = float(self.grad_norm) if self.grad_norm is not None else float("nan")
            self._resolved = StepResult(loss=total / self.losses if not bad else float("nan"), bad_loss=bad > 0,
                                        grad_norm=gn, applied=self.applied, time=self.time, wait=self.wait)
        return self._resolved


@dataclass
class NonFinitePolicy:
    """train.nan_policy: `skip` goes on (ZeRO's overflow check skipped the update) until
    `max_consecutive` non-finite steps in a row; `fail` stops at the first. Under fp16 loss
    scaling a refused update is the scaler's business, not a non-finite step."""

    policy: str
    max_consecutive: int
    loss_scaling: bool = False
    total: int = 0
    consecutive: int = 0

    def observe(self, step: int, r: StepResult) -> bool:
        """Count step `step` (1-based); True when it was non-finite. Raises NonFiniteError.
        A step DeepSpeed applied had finite gradients on every rank (its overflow check is an
        all-reduce), hence finite losses: the trainer reads the losses of refused steps only."""
        if r.applied or (self.loss_scaling and not r.bad_loss):
            self.consecutive = 0
            return False
        self.total += 1
        self.consecutive += 1
        msg = (f"non-finite loss or grad norm at step {step} (loss={r.loss}, grad_norm={r.grad_norm}); "
               f"update was {'applied' if r.applied else 'skipped'}")
        if self.policy == "fail":
            raise NonFiniteError(f"train.nan_policy=fail: {msg}. To go on: {WAY_OUT}, or set train.nan_policy=skip")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(f"{self.consecutive} consecutive non-finite steps (train.max_consecutive_nonfinite="
                                 f"{self.max_consecutive}); last: {msg}. The run diverged: {WAY_OUT}")
        log.warning("skipped: %s", msg)
        return True


@dataclass(frozen=True)
class Cadence:
    """When something periodic is due (logging, evaluation, checkpoint saves, probes, ...): at every
    `every`-th step, plus the first step with `first` and the last (`total`) with `last`;
    `every` 0 switches it off, first and last included. Steps count from 1."""

    every: int
    first: bool = False
    last: bool = False

    def due(self, step: int, total: int) -> bool:
        if self.every <= 0:
            return False
        return step % self.every == 0 or (self.first and step == 1) or (self.last and step == total)


@dataclass(frozen=True)
class Budget:
    """Where training ends, decided here only: `total` steps, set by `key`=`value` (train.max_steps,
    known before anything is built, or train.epochs, known once the data stream says how many
    steps an epoch has: `total` None until then); train.stop_at_step (`stop_at`) ends the run
    earlier, through the preemption path (checkpoint, exit, resumable)."""

    key: str
    value: Any
    total: Optional[int]
    stop_at: Optional[int] = None

    @classmethod
    def of(cls, spec, steps_per_epoch: Optional[float] = None) -> "Budget":
        s = spec.schedule
        known = s.max_steps is not None or steps_per_epoch is not None
        return cls(*s.budget, s.total_steps(steps_per_epoch) if known else None, spec.train.stop_at_step)

    def reached(self, step: int) -> bool:
        return self.total is not None and step >= self.total

    def stops_early(self, step: int) -> bool:
        return self.stop_at is not None and step == self.stop_at and not self.reached(step)

    def resumes(self, step: int, run_dir: str) -> bool:
        """Whether a checkpoint of `step` has training left to do (True while `total` is unknown);
        a checkpoint beyond the budget is a ResumeMismatchError."""
        if self.total is None or step < self.total:
            return True
        if step > self.total:
            setting = f"{self.key}={self.value}" + (f" ({self.total} steps)" if self.value != self.total else "")
            raise ResumeMismatchError(
                f"{run_dir} holds a checkpoint at step {step}, beyond {setting}: it cannot be resumed to a shorter "
                "run. Raise the step budget to continue it, or start a new run with another run.dir=... or "
                "run.resume=never")
        return False

    def completed_message(self, run_dir: str, step: int) -> str:
        return (f"swinv2-train: {run_dir} already completed its {step} steps ({self.key}={self.value}); nothing to "
                f"do. To train on, raise {self.key}; to start over use run.resume=never or another run.dir=...")


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rank_metrics(r: StepResult, global_batch: int, bad_samples: Dict[str, int],
                 max_over_ranks: Callable = distributed.all_reduce_max_list,
                 sum_over_ranks: Callable = distributed.sum_counts,
                 io_events: Optional[Dict[str, int]] = None) -> Dict[str, float]:
    """The per-rank measurements, reduced over ranks (collective; see docs/DESIGN.md):
    images/s = global batch / the slowest rank's step time; data wait = the largest fraction on
    any rank (the slowest loader holds every rank at the next collective); peak memory = max;
    bad-sample counts (data/bad/*) and remote-read events (data/io/*, e.g. retries) = sum."""
    step_time, wait_frac, peak = max_over_ranks([r.time, r.wait / max(r.time, 1e-9), peak_memory_mb()])
    out = {"train/images_per_s": global_batch / max(step_time, 1e-9), "train/data_wait_frac": wait_frac,
           "train/peak_mem_mb": peak}
    counts = {**bad_samples, **{f"io/{k}": v for k, v in (io_events or {}).items()}}  # one collective
    out.update({f"data/{k}" if k.startswith("io/") else f"data/bad/{k}": v
                for k, v in sum_over_ranks(counts).items()})
    return out


# ----------------------------------------------------------------------------- trainer
@dataclass
class TrainState:
    """Where training stands (restored from a checkpoint's client state)."""

    step: int = 0
    data_position: Optional[Dict[str, Any]] = None  # TrainStream's world-independent position
    wandb_id: Optional[str] = None
    rng: Optional[Dict[str, Any]] = None  # this rank's RNG states (+ the task's)
    best_val: Dict[str, float] = field(default_factory=dict)  # absent from what earlier versions saved


KEY_TRACE_ENV = "SWINV2_DEBUG_KEY_TRACE"


class KeyTrace:
    """DEBUG aid (SWINV2_DEBUG_KEY_TRACE=1): every rank appends one line per optimizer step,
    {"step": N, "keys": [...]}, to RUN_DIR/keys_rank{r}.jsonl: the sample keys of its
    micro-batches in order. Tests use it to check that a run resumed on another world size
    reads every sample of an epoch exactly once."""

    def __init__(self, run_dir: str, rank: int):
        self.path = RunDir(run_dir).key_trace(rank)
        self.keys: List[str] = []

    def add(self, keys: List[str]) -> None:
        self.keys.extend(keys)

    def write(self, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "keys": self.keys}) + "\n")
        self.keys = []


@dataclass
class Trainer:
    spec: Any
    env: Any
    engine: Any
    task: Task
    stream: Any
    ckpt: CheckpointManager
    preempt: Any
    logger: Any = field(default_factory=NullLogger)
    step: int = 0
    wandb_id: Optional[str] = None
    probe: Any = None
    last_val: Dict[str, float] = field(default_factory=dict)
    last_saved: Optional[str] = None
    bar: Any = None
    key_trace: Optional[KeyTrace] = None
    ema: Optional[ModelEma] = None  # train.ema_decay (swinv2_train.ema)
    best_val: Dict[str, float] = field(default_factory=dict)  # best_key(k): the best val/top1 (max), val/loss (min)
    info: Dict[str, Any] = field(default_factory=dict)  # what parallelize chose (optimizer, ...), for the run log

    def __post_init__(self):
        t = self.spec.train
        self.steps_per_epoch = self.stream.batches_per_epoch  # a stream batch is a global batch: one step
        self.budget = Budget.of(self.spec, self.steps_per_epoch)
        self.warmup = self.spec.schedule.warmup(self.steps_per_epoch)
        self.nonfinite = NonFinitePolicy(t.nan_policy, t.max_consecutive_nonfinite, t.precision == "fp16")
        self.inject_nan = set(t.debug_inject_nan_steps)
        self.log_cadence = Cadence(t.log_every, last=True)
        # evaluation and checkpoint saves inside the budget; its end has its own (lifecycle.finish)
        self.eval_cadence, self.ckpt_cadence = Cadence(t.eval_every), Cadence(t.ckpt_every)
        self.probe_cadence = Cadence(t.probe_every, first=True, last=True)
        self.meter = Meter(self.step)
        self.profiler = StepProfiler(self.spec.run_dir, t.profile_steps, self.env.device, self.env.rank, t.oom_snapshot)
        self.macs = macs_per_image(self.engine.module)  # None: not a SwinV2 (no TFLOP/s, no MFU)
        self.peak_tflops, self.peak_source = peak_tflops(t.peak_tflops, self.env.device, t.precision)

    @property
    def total(self) -> int:
        """The step budget (known: the data stream is open)."""
        return self.budget.total

    # -- one optimizer step
    def train_step(self, probe=None) -> "DeviceStep":
        """`accum` micro-batches through DeepSpeed (it accumulates and steps at the boundary), with
        no host read of our own: the losses are summed on the device and read at log steps (see
        docs/DESIGN.md, "Host syncs per optimizer step"). A non-finite loss is backpropagated on
        purpose: its NaN gradients make ZeRO's overflow check skip the update and clear its
        gradient partitions (was_step_applied() is then False), which is how the skip policy
        leaves the weights untouched."""
        lr = self.spec.schedule.lr_at(self.step, self.total, self.warmup)
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # layer-wise LR decay (swinv2.param_groups)
        accum, t0 = self.spec.batch.accum, time.perf_counter()
        wait, loss_sum, bad = 0.0, None, None
        for micro in range(accum):
            tw = time.perf_counter()
            batch = self.task.batch(*self.stream.next_batch())
            wait += time.perf_counter() - tw
            if self.key_trace is not None:
                self.key_trace.add(self.stream.last_keys)
            if probe is not None and micro == accum - 1:
                probe.attach()  # stats of the last micro-batch of the step
            loss = self.task.loss(self.engine, batch)
            if probe is not None:
                probe.remove()
            if self.step + 1 in self.inject_nan and self.env.rank == 0:
                loss = loss * float("nan")  # DEBUG (train.debug_inject_nan_steps)
            self.engine.backward(loss)
            self.engine.step()
            finite = torch.isfinite(loss.detach())
            kept = torch.where(finite, loss.detach().double(), 0.0)
            loss_sum = kept if loss_sum is None else loss_sum + kept
            bad = (~finite).float() if bad is None else bad + (~finite).float()
        return DeviceStep(loss_sum=loss_sum, bad=bad, grad_norm=self.engine.get_global_grad_norm(),
                          applied=self.engine.was_step_applied(), losses=accum * self.env.world_size,
                          time=time.perf_counter() - t0, wait=wait)

    # -- the parts around it
    def log_step(self, pending: "DeviceStep", probed: bool) -> None:
        """Collective (the reductions over ranks): call on every rank at the same steps. Its reads
        of the loss wait for the device, so the interval's timing ends here (throughput.Meter)."""
        r = pending.resolve()
        lap = self.meter.lap(self.step, self.total)
        r.time, r.wait = lap["step_time"], lap["wait_frac"] * lap["step_time"]
        b, opt = self.spec.batch, self.engine.optimizer
        # the schedule's rate: the largest group's (with layer decay the head's, scale 1)
        m = {"train/loss": r.loss, "lr": max(g["lr"] for g in opt.param_groups), "train/grad_norm": r.grad_norm,
             "train/loss_scale": float(getattr(opt, "loss_scale", 1.0) or 1.0),
             "train/skipped_steps": self.engine.skipped_steps, "train/nonfinite_steps": self.nonfinite.total,
             "train/step_applied": float(r.applied), "train/samples_seen": self.step * b.global_batch,
             "train/epoch": self.step / self.steps_per_epoch, "train/total_steps": self.total,
             **rank_metrics(r, b.global_batch, self.stream.bad_samples(), io_events=self.stream.io_events()),
             **reduced_train_metrics(self.task)}
        m.update(self.speed_metrics(m["train/images_per_s"], lap))
        if probed:
            m.update(amplitude_metrics(self.probe.stats(), swinv2.probes.logit_scales(self.engine.module)))
            self.probe.clear()
        self.logger.log(m, self.step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{r.loss:.3f}", lr=f"{m['lr']:.2e}")
        elif self.env.rank == 0 and self.log_cadence.due(self.step, self.total):
            log.info("%s", log_line(self.step, self.total, m))

    def speed_metrics(self, images_per_s: float, lap: Dict[str, float]) -> Dict[str, float]:
        """Elapsed, ETA, achieved TFLOP/s per device and, with a peak, MFU (swinv2_train.throughput)."""
        out = {"train/elapsed_s": lap["elapsed"], "train/eta_s": lap["eta"]}
        if self.macs:
            per_device = images_per_s / self.env.world_size
            out["train/tflops"] = model_tflops(self.macs, per_device)
            if self.peak_tflops:
                out["train/mfu_pct"] = mfu_pct(self.macs, per_device, self.peak_tflops)
        return out

    def evaluate(self) -> Dict[str, float]:
        self.last_val = self.task.evaluate(self.engine.module)
        log.info("step %d: %s", self.step, self.task.describe(self.last_val))
        if self.ema is not None:  # the same evaluation with the EMA weights: val_ema/*
            ema = evaluate_ema(self.ema, self.engine.module, self.task.evaluate)
            log.info("step %d: EMA weights: %s", self.step, self.task.describe(ema["val"]))
            self.last_val.update(ema["logged"])
        self.best_val = best_of(self.best_val, self.last_val)
        # samples seen beside the val metrics: W&B plots them against it too (metrics.MetricLogger)
        self.logger.log({**self.last_val, "train/samples_seen": self.step * self.spec.batch.global_batch},
                        self.step)
        self.log_amplitude_figure()
        return self.last_val

    def log_amplitude_figure(self) -> None:
        """The amplitude-per-block figure of the probes so far, as an image (rank 0: W&B, TensorBoard)."""
        if self.env.rank != 0 or self.probe is None:
            return
        metrics = RunDir(self.spec.run_dir).metrics
        if os.path.exists(metrics):
            picture = amplitude_figure(read_jsonl(metrics), depths=list(self.spec.model.depths),
                                       title=f"{self.spec.run.name}: activation RMS per block (step {self.step})")
            if picture is not None:
                self.logger.log_image(AMPLITUDE_IMAGE, picture, self.step)

    def client_state(self) -> Dict[str, Any]:
        """Collective: the data position is gathered from every rank (each holds its streams' offsets)."""
        pos = self.stream.global_position()
        return {"epoch": pos["epoch"], "data_position": pos, "wandb_id": self.logger.wandb_id or self.wandb_id,
                "config": self.spec.config, "best_val": self.best_val}

    def save(self) -> str:
        """Collective: every rank writes its part; its RNG states (+ the task's) go to rng_rank{r}.pt."""
        # the EMA (the same on every rank) is written once, by rank 0
        ema = {EMA_FILE: self.ema.state_dict()} if self.ema is not None and self.env.rank == 0 else {}
        self.last_saved = self.ckpt.save(self.engine, self.step, self.client_state(), extra_rng=self.task.rng_state(),
                                         **({"rank0_files": ema} if ema else {}))
        return self.last_saved

    # -- the loop
    def _report_compile(self, first_of_kind: bool, probed: bool, seconds: float, graphs_before: int) -> None:
        """Log the compile time of the first plain and the first probed step (torch.compile works
        lazily; the probe's hooks need their own graph) and warn of a graph compiled by any later
        step: a recompilation costs minutes and means a guard failed (eval mode compiles in evaluate())."""
        if self.env.rank != 0:
            return
        if first_of_kind:
            log.info("train.compile: first step%s %.1f s (graph capture and compilation included)",
                     " with the amplitude probe" if probed else "", seconds)
        elif _compiled_graphs() != graphs_before:
            log.warning("train.compile: step %d recompiled the model (%.1f s); TORCH_LOGS=recompiles says why",
                        self.step + 1, seconds)

    def fit(self) -> str:
        """Train to the step budget; 'completed' or 'preempted' (checkpoint saved, requeued)."""
        t = self.spec.train
        compiled_kinds: set = set()  # probed or not: the kinds of step compiled so far
        self.meter = Meter(self.step)
        while not self.budget.reached(self.step):
            if self.preempt.should_stop():  # collective, every step boundary
                self.profiler.finish(self.step)
                self.save()
                self.preempt.requeue()
                return "preempted"
            # the probe's hooks go in before the step they measure (the one numbered step + 1)
            probed = self.probe is not None and self.probe_cadence.due(self.step + 1, self.total)
            graphs = _compiled_graphs() if t.compile else 0
            self.profiler.before_step(self.step + 1)
            with self.profiler.oom_guard(self.step + 1):
                r = self.train_step(self.probe if probed else None)
            self.profiler.after_step(self.step + 1)
            if t.compile:
                self._report_compile(probed not in compiled_kinds, probed, r.time, graphs)
                compiled_kinds.add(probed)
            self.step += 1
            self.meter.add_step(r.wait)
            if self.ema is not None and r.applied:  # a skipped (non-finite) step leaves the weights, and the EMA
                self.ema.update(self.engine.module)
            if self.key_trace is not None:
                self.key_trace.write(self.step)
            # an applied step had finite losses (NonFinitePolicy.observe): only a refused one is read
            nonfinite = self.nonfinite.observe(self.step, r if r.applied else r.resolve())
            if self.log_cadence.due(self.step, self.total) or nonfinite or probed:
                self.log_step(r, probed)
            if self.bar is not None:
                self.bar.update(1)
            if hasattr(self.task, "after_step"):  # e.g. SimMIM's reconstruction pictures (rank 0, no collective)
                self.task.after_step(self.step, self.engine.module, self.logger)
            inside = not self.budget.reached(self.step)
            if inside and self.eval_cadence.due(self.step, self.total):
                self.outside_interval(self.evaluate)
            if inside and self.ckpt_cadence.due(self.step, self.total):
                self.outside_interval(self.save)
            if self.budget.stops_early(self.step):
                self.preempt.request_stop()  # same path as a preemption signal: save at the boundary, exit
        self.profiler.finish(self.step)  # train.profile_steps past the budget: the steps traced so far
        return "completed"

    def outside_interval(self, work: Callable[[], Any]) -> Any:
        """Run `work` (an evaluation, a checkpoint save) with its time left out of the throughput
        interval; the device first finishes the training steps queued before it."""
        device_synchronize(self.env.device)
        t0 = time.perf_counter()
        try:
            return work()
        finally:
            self.meter.pause(time.perf_counter() - t0)


def log_line(step: int, total: int, m: Dict[str, float]) -> str:
    """The log line of a log step (rank 0): progress and time, the loss, then the speed."""
    parts = [f"step {step}/{total}", f"elapsed {format_duration(m['train/elapsed_s'])}",
             f"ETA {format_duration(m['train/eta_s'])}", f"loss {m['train/loss']:.4f}", f"lr {m['lr']:.3e}",
             f"grad_norm {m['train/grad_norm']:.3f}", f"{m['train/images_per_s']:.0f} img/s",
             f"data wait {100 * m['train/data_wait_frac']:.0f}%"]
    if "train/tflops" in m:
        parts.append(f"{m['train/tflops']:.3g} TFLOP/s")
    if "train/mfu_pct" in m:
        parts.append(f"MFU {m['train/mfu_pct']:.1f}%")
    parts.append(f"peak mem {m['train/peak_mem_mb']:.0f} MB")
    return " | ".join(parts)


def _compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# ----------------------------------------------------------------------------- setup
def restore(ckpt: CheckpointManager, engine, resume_dir: Optional[str]) -> TrainState:
    """Load `resume_dir` into the engine (nothing without one); the state to go on from."""
    if resume_dir is None:
        return TrainState()
    client = ckpt.load(engine, resume_dir)
    position = saved_position(client, warn=ckpt.rank == 0)
    state = TrainState(step=client["step"], data_position=position, wandb_id=client.get("wandb_id"),
                       rng=client.get("rng"), best_val=dict(client.get("best_val") or {}))
    where = position or {}
    log.info("resumed from %s (step %d, epoch %d, batch %d)", resume_dir, state.step, where.get("epoch", 0),
             where.get("batch", 0))
    return state


def open_stream(spec, env, task: Task, position: Optional[Dict[str, Any]] = None) -> TrainStream:
    """This rank's training stream of `spec` (the elastic order, swinv2_train.data.stream), from a
    saved data position (None: the start). A task without labels (SimMIM) has the stream draw
    its masks per sample instead."""
    masks = None if getattr(task, "labels", True) else task.stream_masks(spec)
    return TrainStream(spec.data, img_size=spec.model.img_size, global_batch=spec.batch.global_batch,
                       grad_accum=spec.batch.accum, rank=env.rank, world_size=env.world_size,
                       seed=spec.run.seed, position=position, masks=masks)


def build_trainer(spec, env, preempt, resume_dir: Optional[str]) -> Trainer:
    """Task class -> model -> engine -> restored state -> per-rank random streams -> task -> batch
    stream. The task class answers the questions that depend on the objective (swinv2_train.tasks):
    its model (with `model.pretrained` loaded unless resuming), where the backbone's parameter names
    start (the optimizer's groups) and what the data stream draws."""
    task_cls = task_class(spec)  # the one lookup of the run's task
    model = task_cls.build_model(spec, resume_dir is not None)
    engine, info = parallelize(spec, model, backbone_prefix=task_cls.backbone_prefix)
    ckpt = CheckpointManager(spec.run_dir, spec.train.keep_ckpts, env.rank, env.world_size)
    state = restore(ckpt, engine, resume_dir)
    ema = build_ema(spec, engine.module, resume_dir)  # after the restore: a fresh EMA starts at these weights
    seed_rank_streams(spec.run.seed, env.rank)
    task = task_cls(spec, env)
    if state.rng is not None:
        set_rng_state(state.rng)
        task.set_rng_state(state.rng)
    stream = open_stream(spec, env, task, state.data_position)
    probe = swinv2.probes.AmplitudeProbe(engine.module) if spec.train.probe_every > 0 else None
    key_trace = KeyTrace(spec.run_dir, env.rank) if os.environ.get(KEY_TRACE_ENV) == "1" else None
    return Trainer(spec=spec, env=env, engine=engine, task=task, stream=stream, ckpt=ckpt, preempt=preempt,
                   step=state.step, wandb_id=state.wandb_id, probe=probe, ema=ema, key_trace=key_trace, info=info,
                   best_val=state.best_val)


def progress_bar(spec, env, total: int, initial: int):
    t = spec.train
    if env.rank == 0 and (t.progress == "bar" or (t.progress == "auto" and sys.stderr.isatty())):
        return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
    return None

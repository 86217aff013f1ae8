"""`swinv2-train`'s run: config -> spec -> process group -> resume decision -> Trainer -> the end
of the run (final evaluation, checkpoint, export, amplitude plot, summary).

    run(cfg)                  the composed Hydra config; everything after it reads the RunSpec
      resolve_spec            validation and data sources, before any process group (errors name keys)
      init_distributed        the process group (DeepSpeed's, gloo on CPU / NCCL on GPUs)
      plan_resume             rank 0 decides, every rank follows (broadcast), before any model exists
      build_trainer -> fit    swinv2_train.trainer
      finish                  final eval + checkpoint + export + plot + summary
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from . import distributed
from .allocator import apply_cpu_malloc_policy
from .amplitudes import plot_amplitudes
from .checkpoint import check_resumable, export_checkpoint, read_marker, resolve_resume, saved_config
from .data.config import kept_from_before
from .errors import UserError
from .metrics import WandbIdentity, build_logger, read_jsonl
from .preemption import PreemptionHandler
from .rundir import EMA_EXPORT_FILE, VAL_LOSS, VAL_TOP1, VAL_TOP5, RunDir, ema_key, set_aside
from .spec import RunSpec, resolve_spec
from .trainer import Budget, Trainer, build_trainer, progress_bar

log = logging.getLogger("train")


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Train according to `cfg` (already composed by Hydra); returns a summary dict."""
    t_start = time.time()
    spec = resolve_spec(cfg)  # before any process group; the data sources are read here, once
    preempt = PreemptionHandler()  # before the process group: a signal during start-up is kept
    env = distributed.init_distributed(timeout_s=spec.train.dist_timeout_s)
    _setup_logging(env.rank)
    try:
        return train(spec, env, preempt, t_start)
    finally:
        distributed.shutdown()


def train(spec: RunSpec, env, preempt, t_start: float) -> Dict[str, Any]:
    # one decision for every rank, before the run dir's config.yaml is rewritten and before any
    # model or engine exists (a checkpoint that does not fit must not cost a DeepSpeed start-up)
    plan = distributed.broadcast_object(plan_resume(spec, env.world_size) if env.rank == 0 else None)
    if isinstance(plan, Exception):
        if isinstance(plan, UserError):
            plan.same_on_every_rank = True  # rank 0 reports it; the others stay quiet
        raise plan
    if plan["set_aside"] and env.rank == 0:
        log.info("run.resume=never: moved the earlier checkpoint folders of %s to %s", spec.run_dir,
                 plan["set_aside"])
    if plan["completed"]:
        return _already_completed(spec, env, Budget.of(spec), plan["step"])
    spec = _kept_from_the_run(spec, plan["kept"], env.rank)
    os.makedirs(spec.run_dir, exist_ok=True)
    if env.rank == 0:  # the resolved config, class count included (resume checks read it)
        OmegaConf.save(OmegaConf.create(spec.config), RunDir(spec.run_dir).config)
    if env.device.type == "cpu":
        torch.set_num_threads(cpu_threads(spec.train.cpu_threads, spec.data.num_workers))
        apply_cpu_malloc_policy(spec.train.cpu_malloc, spec.model.img_size)  # before the model and engine allocate anything

    trainer = build_trainer(spec, env, preempt, plan["resume_dir"])
    # train.epochs: the step budget is known only now (batches per epoch); train.max_steps: plan_resume decided
    if plan["resume_dir"] is not None and not trainer.budget.resumes(trainer.step, spec.run_dir):
        return _already_completed(spec, env, trainer.budget, trainer.step)
    trainer.logger = build_logger(env.rank, spec.run_dir, spec.logger, trainer.wandb_id, config=spec.config,
                                  identity=WandbIdentity.of(spec, experiment_name()))
    _log_start(trainer)
    trainer.bar = progress_bar(spec, env, trainer.total, trainer.step)
    t_train = time.perf_counter()
    stopped = trainer.fit()
    trainer.stream.close()  # its DataLoader workers: not needed by the final evaluation
    if trainer.bar is not None:
        trainer.bar.close()
    summary = {"step": trainer.step, "stopped": stopped, "train_time_s": time.perf_counter() - t_train,
               "run_dir": spec.run_dir}
    return finish(trainer, summary, t_start)


def finish(trainer: Trainer, summary: Dict[str, Any], t_start: float) -> Dict[str, Any]:
    """A completed run: final evaluation, checkpoint, amplitude plot and official export."""
    spec, rank = trainer.spec, trainer.env.rank
    completed = summary["stopped"] == "completed"
    if completed:
        trainer.evaluate()  # also logs the amplitude figure of the whole run as an image
        trainer.save()
        if hasattr(trainer.task, "final_pictures"):  # e.g. SimMIM's reconstruction of the last step
            trainer.task.final_pictures(trainer.step, trainer.engine.module, trainer.logger)
    summary.update(wall_time_s=time.time() - t_start, checkpoint=trainer.last_saved,
                   nonfinite_steps=trainer.nonfinite.total, **trainer.last_val, **trainer.best_val)
    if rank == 0 and completed:
        run = RunDir(spec.run_dir)
        if os.path.exists(run.metrics):
            summary["amplitudes_png"] = plot_amplitudes(read_jsonl(run.metrics), run.amplitudes_png,
                                                        title=f"{spec.run.name}: activation RMS per block",
                                                        depths=list(spec.model.depths))
        if spec.run.export_official and trainer.last_saved:  # the checkpoint just saved, of the last step
            summary["export"] = run.file(trainer.task.export_file)  # the task's format (SimMIM: its own)
            export_checkpoint(trainer.last_saved, summary["export"])
            if trainer.ema is not None:  # the EMA of weights, in the same format
                summary["export_ema"] = run.file(EMA_EXPORT_FILE)
                export_checkpoint(trainer.last_saved, summary["export_ema"], ema=True)
    trainer.logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    summary["wandb_dir"] = getattr(trainer.logger, "wandb_dir", None)
    trainer.logger.close()
    if rank == 0:
        print_summary(summary)
    distributed.barrier()
    return summary


def plan_resume(spec: RunSpec, world_size: int):
    """Rank 0, before anything is built: {resume_dir, step, completed, set_aside}, or the
    exception that stops the run (returned, so that it is broadcast and raised on every rank)."""
    plan = {"resume_dir": None, "step": 0, "completed": False, "set_aside": None, "kept": {}}
    try:
        if spec.run.resume == "never":
            plan["set_aside"] = set_aside(spec.run_dir)
            return plan
        resume_dir = resolve_resume(spec.run.resume, spec.run_dir)
        if resume_dir is None:
            return plan
        check_resumable(resume_dir, spec.config, world_size, spec.run_dir, spec.num_classes)
        plan["kept"] = kept_from_before((saved_config(resume_dir) or {}).get("data"))
        step = int(read_marker(resume_dir).get("step", 0))
        completed = not Budget.of(spec).resumes(step, spec.run_dir)  # train.epochs: decided after the build
        plan.update(resume_dir=resume_dir, step=step, completed=completed)
    except Exception as e:  # returned, not raised: the other ranks wait for this answer
        return e
    return plan


def _kept_from_the_run(spec: RunSpec, kept: Dict[str, Any], rank: int) -> RunSpec:
    if not kept:
        return spec
    if rank == 0:
        log.info("resuming a run begun before %s existed: it keeps %s", ", ".join(f"data.{k}" for k in kept),
                 ", ".join(f"data.{k}={v}" for k, v in kept.items()))
    config = {**spec.config, "data": {**spec.config["data"], **kept}}
    return dataclasses.replace(spec, data=dataclasses.replace(spec.data, **kept), config=config)


def _already_completed(spec: RunSpec, env, budget: Budget, step: int) -> Dict[str, Any]:
    if env.rank == 0:
        print(budget.completed_message(spec.run_dir, step), flush=True)
    return {"step": step, "stopped": "already_completed", "run_dir": spec.run_dir}


def _log_start(trainer: Trainer) -> None:
    spec, env, b = trainer.spec, trainer.env, trainer.spec.batch
    n_params = sum(p.numel() for p in trainer.engine.module.parameters())
    log.info("run dir %s | %s | %.2fM params | world %d (%s) | global batch %d = %d micro x %d accum x %d ranks"
             " | %d steps (%.1f per epoch), warmup %d | %s | task %s",
             spec.run_dir, spec.variant, n_params / 1e6, env.world_size, env.launcher, b.global_batch, b.micro,
             b.accum, env.world_size, trainer.total, trainer.steps_per_epoch, trainer.warmup,
             lr_description(spec.schedule.lr, spec.optim.lr, spec.optim.lr_batch_ref, b.global_batch), spec.task.name)
    log.info("optimizer: %s", trainer.info["optimizer"])
    if trainer.macs:
        log.info("throughput: %.3g GMAC per image forward, x 6 FLOPs per training image (recomputation not "
                 "counted); MFU %s", trainer.macs / 1e9,
                 f"against {trainer.peak_tflops:g} TFLOP/s ({trainer.peak_source})" if trainer.peak_tflops
                 else f"not logged ({trainer.peak_source})")


def lr_description(effective: float, base: float, batch_ref: Optional[int], global_batch: int) -> str:
    """The run log's learning-rate part: how optim.lr became the rate the schedule peaks at."""
    if not batch_ref:
        return f"lr {effective:.3g} (optim.lr; optim.lr_batch_ref=null: not scaled by the batch)"
    return f"effective lr {effective:.3g} (optim.lr {base:.3g} x batch {global_batch} / optim.lr_batch_ref {batch_ref})"


def experiment_name() -> Optional[str]:
    """The recipe chosen with experiment=NAME (Hydra's runtime choices); None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("experiment")


def cpu_threads(requested: Optional[int], num_workers: int) -> int:
    """Intra-op threads for training on the CPU. Auto: this rank's share of the cores minus its data
    workers (at least 1). Workers decode while the model computes; with more busy threads than
    cores, OpenMP's spinning threads stall (steps here ran 30x slower, intermittently).
    An explicit OMP_NUM_THREADS is respected."""
    if requested:
        return int(requested)
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    local_ranks = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1  # torchrun / deepspeed
    cores = len(os.sched_getaffinity(0)) // max(1, int(local_ranks))
    return max(1, cores - num_workers)


def _setup_logging(rank: int) -> None:
    if rank != 0:  # other ranks: warnings and errors only
        logging.getLogger().setLevel(logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_summary(s: Dict[str, Any]) -> None:
    rd = s["run_dir"]
    lines = [f"== swinv2-train {s['stopped']} at step {s['step']} "
             f"(train {s['train_time_s']:.1f} s, wall {s['wall_time_s']:.1f} s) =="]
    if VAL_TOP1 in s:
        lines.append(f"final val top-1 {s[VAL_TOP1]:.2f}%  top-5 {s[VAL_TOP5]:.2f}%  loss {s[VAL_LOSS]:.4f}")
    elif VAL_LOSS in s:  # e.g. SimMIM: the masked L1
        lines.append(f"final val loss {s[VAL_LOSS]:.4f}")
    if ema_key(VAL_TOP1) in s:
        lines.append(f"EMA weights top-1 {s[ema_key(VAL_TOP1)]:.2f}%  top-5 {s[ema_key(VAL_TOP5)]:.2f}%  "
                     f"loss {s[ema_key(VAL_LOSS)]:.4f}")
    run = RunDir(rd)
    lines += [f"run dir     {rd}",
              f"checkpoint  {s['checkpoint']}  (resume: same command, run.resume=auto)",
              f"metrics     {run.metrics}"]
    if os.path.isdir(run.tensorboard):
        lines.append(f"tensorboard tensorboard --logdir {run.tensorboard}")
    if s.get("wandb_dir"):
        lines.append(f"wandb       wandb sync {os.path.dirname(s['wandb_dir'].rstrip('/'))}")
    if s.get("amplitudes_png"):
        lines.append(f"amplitudes  {s['amplitudes_png']}")
    lines.append(f"export      python -m swinv2_train.checkpoint export {rd} OUT.pth"
                 + (f"  (done: {s['export']})" if s.get("export") else ""))
    if s.get("export_ema"):
        lines.append(f"export EMA  {s['export_ema']}  (--ema)")
    print("\n".join(lines), flush=True)

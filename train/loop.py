"""The trainer: setup, train step, evaluation, checkpoints and logging around a DeepSpeed engine."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import resource
import sys
import time
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from swinv2_train import config as C
from swinv2_train.evaluate import evaluate  # the one evaluation path (also swinv2-eval)
from swinv2_train.errors import NonFiniteError, ResumeMismatchError, UserError  # noqa: F401 (re-exported)

log = logging.getLogger("train")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- helpers
def cosine_lr(step: int, total: int, warmup: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """LR of 0-based optimizer step `step`: linear warmup from warmup_lr, then cosine to min_lr
    over the remaining steps (timm CosineLRScheduler with warmup_prefix, stepped per iteration)."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


@contextlib.contextmanager
def isolated_rng():
    """Run a block without touching the training RNG streams (data loader iterators draw seeds
    from the global torch RNG; evaluation must not shift training randomness either). This is
    what makes a resumed run bit-identical to an uninterrupted one."""
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])


def all_reduce_sum(values, device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class DataStream:
    """Micro-batches across epochs with a resumable position (epoch, batch in epoch)."""

    def __init__(self, data_cfg, *, img_size, micro_global, rank, world_size, seed, epoch=0, batch=0):
        self.kw = dict(img_size=img_size, global_batch_size=micro_global, rank=rank,
                       world_size=world_size, seed=seed)
        self.data_cfg = data_cfg
        self.epoch, self.batch = epoch, batch
        self._bad_done: Dict[str, int] = {}
        self._open()
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._open()

    def _open(self):
        from swinv2_train.data import build_train_loader
        self.loader = build_train_loader(self.data_cfg, epoch=self.epoch, start_batch=self.batch, **self.kw)
        self.batches_per_epoch = self.loader.batches_per_epoch
        self._it = None

    def next(self):
        with isolated_rng():
            while True:
                if self._it is None:
                    self._it = iter(self.loader)
                try:
                    x, y = next(self._it)
                    break
                except StopIteration:
                    for k, v in self.loader.bad_samples().items():
                        self._bad_done[k] = self._bad_done.get(k, 0) + v
                    self.epoch, self.batch = self.epoch + 1, 0
                    self._open()
        self.batch += 1
        return x, y

    def position(self):
        if self.batch >= self.batches_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.batch

    def bad_samples(self) -> Dict[str, int]:
        out = dict(self._bad_done)
        for k, v in self.loader.bad_samples().items():
            out[k] = out.get(k, 0) + v
        return out


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.ndim == 1:
        return F.cross_entropy(logits, target)
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


# ----------------------------------------------------------------------------- train step
def train_step(engine, stream, *, env, dtype, accum, mixup, mix_gen, inject_nan, probe=None) -> Dict[str, Any]:
    """One optimizer step = `accum` micro-batches through DeepSpeed (it accumulates and steps at
    the boundary). A non-finite loss is backpropagated on purpose: its NaN gradients make
    ZeRO's overflow check skip the update and clear its gradient partitions (was_step_applied()
    is then False), which is how the skip policy leaves the weights untouched."""
    t0 = time.perf_counter()
    wait, loss_sum, local_bad = 0.0, 0.0, 0.0
    for micro in range(accum):
        tw = time.perf_counter()
        x, y = stream.next()
        wait += time.perf_counter() - tw
        x, y = x.to(env.device), y.to(env.device)
        if mixup is not None:
            x, y = mixup(x, y, mix_gen)
        if probe is not None and micro == accum - 1:
            probe.attach()  # stats of the last micro-batch of the step
        loss = soft_cross_entropy(engine(x.to(dtype)).float(), y)
        if probe is not None:
            probe.remove()
        if inject_nan and env.rank == 0:
            loss = loss * float("nan")  # DEBUG (train.debug_inject_nan_steps)
        engine.backward(loss)
        engine.step()
        lv = loss.item()
        local_bad += 0.0 if math.isfinite(lv) else 1.0
        loss_sum += lv if math.isfinite(lv) else 0.0
    # one collective per step: mean loss over ranks, and whether any rank saw a bad loss
    tot = all_reduce_sum([loss_sum, local_bad], env.device).tolist()
    gn = engine.get_global_grad_norm()
    gn = float(gn) if gn is not None else float("nan")
    bad_loss = tot[1] > 0
    return {"loss": tot[0] / (accum * env.world_size) if not bad_loss else float("nan"),
            "bad_loss": bad_loss, "grad_norm": gn, "applied": engine.was_step_applied(),
            "time": time.perf_counter() - t0, "wait": wait}


# ----------------------------------------------------------------------------- run
def _prepare_data_cfg(cfg: DictConfig):
    """DataConfig for the loaders, its sources resolved once per run (data.root, shard patterns
    or the built-in synthetic set; shards, sample counts, num_classes): the loaders of every
    epoch then read nothing but the shards."""
    from swinv2_train.data import resolve_sources

    return resolve_sources(cfg.data)


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


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Train according to `cfg` (already composed by Hydra); returns a summary dict."""
    C.validate(cfg)  # before any process group or data
    t_start = time.time()
    from swinv2_train.distributed import init_distributed, shutdown
    from swinv2_train.preemption import PreemptionHandler

    preempt = PreemptionHandler()  # before the process group: a signal during start-up is kept
    env = init_distributed(timeout_s=cfg.train.dist_timeout_s)
    _setup_logging(env.rank)
    try:
        return _run(cfg, env, t_start, preempt)
    finally:
        shutdown()


def _run(cfg: DictConfig, env, t_start: float, preempt) -> Dict[str, Any]:
    import swinv2
    from swinv2_train.checkpoint import CheckpointManager, set_rng_state
    from swinv2_train.data import build_mixup
    from swinv2_train.metrics import build_logger
    from swinv2_train.parallelize import parallelize
    from swinv2_train.amplitudes import amplitude_metrics, plot_amplitudes
    from swinv2_train.distributed import broadcast_object

    t, rank = cfg.train, env.rank
    run_dir = os.path.abspath(cfg.run.dir)
    # one decision for every rank, before the run dir's config.yaml is rewritten and before any
    # model or engine exists (a checkpoint that does not fit must not cost a DeepSpeed start-up)
    data_cfg = _prepare_data_cfg(cfg)  # the class count may come from the data source
    plan = broadcast_object(_plan_resume(cfg, run_dir, env.world_size, data_cfg.num_classes) if rank == 0 else None)
    if isinstance(plan, Exception):
        if isinstance(plan, UserError):
            plan.same_on_every_rank = True  # rank 0 reports it; the others stay quiet
        raise plan
    resume_dir = plan["resume_dir"]
    if plan["set_aside"] and rank == 0:
        log.info("run.resume=never: moved the earlier checkpoints of %s to %s", run_dir, plan["set_aside"])
    if plan["completed"]:
        if rank == 0:
            print(already_completed_message(run_dir, plan["step"], "train.max_steps", t.max_steps), flush=True)
        return {"step": plan["step"], "stopped": "already_completed", "run_dir": run_dir}
    # the resolved config, class count included (data.num_classes may be null = from the data
    # source): the run dir's config.yaml and every checkpoint's copy, which resume checks read
    saved_config = OmegaConf.to_container(cfg, resolve=True)
    saved_config["data"]["num_classes"] = data_cfg.num_classes
    os.makedirs(run_dir, exist_ok=True)
    if rank == 0:
        OmegaConf.save(OmegaConf.create(saved_config), os.path.join(run_dir, "config.yaml"))
    num_classes = data_cfg.num_classes
    if env.device.type == "cpu":
        torch.set_num_threads(cpu_threads(t.cpu_threads, data_cfg.num_workers))
    dtype = DTYPES[t.precision]
    micro = t.batch_size // (env.world_size * t.grad_accum)

    # same init on every rank (DeepSpeed also broadcasts rank 0's weights)
    torch.manual_seed(cfg.run.seed)
    model = swinv2.create_model(**C.model_kwargs(cfg.model, num_classes))
    if cfg.model.pretrained and resume_dir is None:
        report = swinv2.load_official_state_dict(model, cfg.model.pretrained,
                                                 class_map=cfg.model.pretrained_class_map)
        log.info("loaded %s (head: %s)", cfg.model.pretrained, report.head_action)
    n_params = sum(p.numel() for p in model.parameters())
    engine, info = parallelize(cfg, model, env.world_size)

    ckpt = CheckpointManager(run_dir, t.keep_ckpts, rank, env.world_size)
    step, epoch, batch, wandb_id, rank_rng = 0, 0, 0, None, None
    if resume_dir is not None:
        client = ckpt.load(engine, resume_dir)
        step, (epoch, batch) = client["step"], client["data_position"]
        wandb_id, rank_rng = client.get("wandb_id"), client.get("rng")
        log.info("resumed from %s (step %d, epoch %d, batch %d)", resume_dir, step, epoch, batch)
        saved_workers = client.get("data_workers", data_cfg.num_workers)
        if saved_workers != data_cfg.num_workers and rank == 0:
            # batch i comes from worker i % W: the position stays right, the sample order does not
            log.warning("data.num_workers is %d, the checkpoint was written with %d: training continues from "
                        "the same data position, but not in the order an uninterrupted run would have seen",
                        data_cfg.num_workers, saved_workers)

    # per-rank randomness (drop path, mixup) differs between ranks but is reproducible
    torch.manual_seed(cfg.run.seed * 1000 + rank + 1)
    random.seed(cfg.run.seed * 1000 + rank + 1)
    np.random.seed(cfg.run.seed * 1000 + rank + 1)
    mix_gen = torch.Generator().manual_seed(cfg.run.seed * 7919 + rank)
    if rank_rng is not None:
        set_rng_state(rank_rng)
        mix_gen.set_state(rank_rng["mixup"])

    stream = DataStream(data_cfg, img_size=cfg.model.img_size, micro_global=micro * env.world_size,
                        rank=rank, world_size=env.world_size, seed=cfg.run.seed, epoch=epoch, batch=batch)
    steps_per_epoch = stream.batches_per_epoch / t.grad_accum
    total = int(t.max_steps) if t.max_steps is not None else math.ceil(t.epochs * steps_per_epoch)
    if t.max_steps is None and resume_dir is not None and step >= total:  # known only now (epochs)
        if step > total:
            raise _beyond_budget_error(run_dir, step, f"train.epochs={t.epochs} ({total} steps)")
        if rank == 0:
            print(already_completed_message(run_dir, step, "train.epochs", t.epochs), flush=True)
        return {"step": step, "stopped": "already_completed", "run_dir": run_dir}
    s = cfg.sched
    warmup = int(s.warmup_steps) if s.warmup_steps is not None else round((s.warmup_epochs or 0) * steps_per_epoch)
    lr_peak, lr_warm, lr_min = (C.effective_lr(cfg), C.effective_lr(cfg, s.warmup_lr), C.effective_lr(cfg, s.min_lr))
    mixup = build_mixup(data_cfg, num_classes)
    class_map = None
    if t.eval_class_map:
        from swinv2.weights import read_class_map
        class_map = read_class_map(t.eval_class_map, num_source=num_classes).to(env.device)
    eval_kw = dict(img_size=cfg.model.img_size, batch_size=t.eval_batch_size or micro,
                   device=env.device, rank=rank, world_size=env.world_size, dtype=dtype,
                   class_map=class_map)
    probe = swinv2.probes.AmplitudeProbe(engine.module) if t.amp_every > 0 else None

    logger = build_logger(rank, run_dir, cfg.logger, wandb_id,
                          config=OmegaConf.to_container(cfg, resolve=True))
    log.info("run dir %s | %s | %.2fM params | world %d (%s) | global batch %d = %d micro x %d accum x %d ranks"
             " | %d steps (%.1f per epoch), warmup %d | effective lr %.3g (base %.3g per %s)",
             run_dir, cfg.model.variant, n_params / 1e6, env.world_size, env.launcher, t.batch_size, micro,
             t.grad_accum, env.world_size, total, steps_per_epoch, warmup, lr_peak, cfg.optim.lr,
             cfg.optim.lr_batch_ref)
    log.info("optimizer: %s", info["optimizer"])

    def client_state():
        return {"epoch": stream.position()[0], "data_position": stream.position(),
                "data_workers": data_cfg.num_workers,
                "wandb_id": logger.wandb_id or wandb_id, "config": saved_config}

    def save(at_step):  # every rank; its RNG states (+ mixup generator) go to rng_rank{r}.pt
        return ckpt.save(engine, at_step, client_state(), extra_rng={"mixup": mix_gen.get_state()})

    bar = None
    use_bar = rank == 0 and (t.progress == "bar" or (t.progress == "auto" and sys.stderr.isatty()))
    if use_bar:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True)

    inject = set(t.debug_inject_nan_steps)
    nonfinite_total, consecutive, last_saved, stopped = 0, 0, None, None
    last_val: Dict[str, float] = {}
    t_train = time.perf_counter()
    while step < total:
        if preempt.should_stop():  # collective, every step boundary
            last_saved = save(step)
            preempt.requeue()
            stopped = "preempted"
            break
        lr = cosine_lr(step, total, warmup, lr_peak, lr_warm, lr_min)
        for g in engine.optimizer.param_groups:
            g["lr"] = lr
        want_amp = probe is not None and (step == 0 or (step + 1) % t.amp_every == 0 or step + 1 == total)
        r = train_step(engine, stream, env=env, dtype=dtype, accum=t.grad_accum, mixup=mixup,
                       mix_gen=mix_gen, inject_nan=(step + 1) in inject, probe=probe if want_amp else None)
        step += 1
        # non-finite: a bad loss on any rank, or (outside fp16 loss scaling) a refused update
        nonfinite = r["bad_loss"] or (t.precision != "fp16" and not r["applied"])
        if nonfinite:
            nonfinite_total += 1
            consecutive += 1
            msg = (f"non-finite loss or grad norm at step {step} (loss={r['loss']}, "
                   f"grad_norm={r['grad_norm']}); update was {'applied' if r['applied'] else 'skipped'}")
            way_out = ("lower optim.lr or raise sched.warmup_steps (or try train.precision=fp32); the same "
                       "command then resumes from the last checkpoint")
            if t.nan_policy == "fail":
                raise NonFiniteError(f"train.nan_policy=fail: {msg}. To go on: {way_out}, or set "
                                     "train.nan_policy=skip")
            if consecutive >= t.max_consecutive_nonfinite:
                raise NonFiniteError(f"{consecutive} consecutive non-finite steps (train.max_consecutive_nonfinite="
                                     f"{t.max_consecutive_nonfinite}); last: {msg}. The run diverged: {way_out}")
            log.warning("skipped: %s", msg)
        else:
            consecutive = 0
        if step % t.log_every == 0 or nonfinite or want_amp or step == total:
            m = {"train/loss": r["loss"], "lr": lr, "train/grad_norm": r["grad_norm"],
                 "train/loss_scale": float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0),
                 "train/skipped_steps": engine.skipped_steps, "train/nonfinite_steps": nonfinite_total,
                 "train/step_applied": float(r["applied"]),
                 "train/images_per_s": t.batch_size / max(r["time"], 1e-9),
                 "train/samples_seen": step * t.batch_size, "train/epoch": step / steps_per_epoch,
                 "train/data_wait_frac": r["wait"] / max(r["time"], 1e-9),
                 "train/peak_mem_mb": peak_memory_mb()}
            m.update({f"data/bad/{k}": v for k, v in stream.bad_samples().items()})
            if want_amp:
                m.update(amplitude_metrics(probe.stats(), swinv2.probes.logit_scales(engine.module)))
                probe.clear()
            logger.log(m, step)
            if bar is not None:
                bar.set_postfix(loss=f"{r['loss']:.3f}", lr=f"{lr:.2e}")
            elif rank == 0 and (step % t.log_every == 0 or step == total):
                log.info("step %d/%d loss %.4f lr %.3e grad_norm %.3f %.0f img/s wait %.0f%%", step, total,
                         r["loss"], lr, r["grad_norm"], m["train/images_per_s"], 100 * m["train/data_wait_frac"])
        if bar is not None:
            bar.update(1)
        if t.eval_every and step % t.eval_every == 0 and step < total:
            last_val = evaluate(engine.module, data_cfg, **eval_kw)
            logger.log(last_val, step)
            log.info("step %d: val top-1 %.2f top-5 %.2f loss %.4f", step, last_val["val/top1"],
                     last_val["val/top5"], last_val["val/loss"])
        if t.ckpt_every and step % t.ckpt_every == 0 and step < total:
            last_saved = save(step)
        if t.stop_at_step is not None and step == t.stop_at_step and step < total:
            preempt.request_stop()  # same path as a preemption signal: save at the boundary, exit
    if bar is not None:
        bar.close()
    train_time = time.perf_counter() - t_train

    if stopped is None:  # end of the run: evaluate, checkpoint, export, plot
        last_val = evaluate(engine.module, data_cfg, **eval_kw)
        logger.log(last_val, step)
        last_saved = save(step)
    summary = {"step": step, "stopped": stopped or "completed", "train_time_s": train_time,
               "wall_time_s": time.time() - t_start, "run_dir": run_dir, "checkpoint": last_saved,
               "nonfinite_steps": nonfinite_total, **last_val}
    if rank == 0 and stopped is None:
        from swinv2_train.metrics import read_jsonl
        jsonl = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(jsonl):
            summary["amplitudes_png"] = plot_amplitudes(read_jsonl(jsonl), os.path.join(run_dir, "amplitudes.png"),
                                                        title=f"{cfg.run.name}: activation RMS per block",
                                                        depths=list(engine.module.config.depths))
        if cfg.run.export_official and last_saved:
            from swinv2_train.checkpoint import export
            out = os.path.join(run_dir, "model_official.pth")
            export(run_dir, out, step)
            summary["export"] = out
    logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    summary["wandb_dir"] = getattr(logger, "wandb_dir", None)
    logger.close()
    if rank == 0:
        print_summary(summary)
    if dist.is_initialized():
        dist.barrier()
    return summary


def _plan_resume(cfg: DictConfig, run_dir: str, world_size: int, num_classes: int):
    """Rank 0, before anything is built: {resume_dir, step, completed, set_aside}, or the
    exception that stops the run (returned, so that it is broadcast and raised on every rank)."""
    from swinv2_train.checkpoint import check_resumable, read_marker, resolve_resume, set_aside_checkpoints

    plan = {"resume_dir": None, "step": 0, "completed": False, "set_aside": None}
    try:
        if cfg.run.resume == "never":
            plan["set_aside"] = set_aside_checkpoints(run_dir)
            return plan
        resume_dir = resolve_resume(cfg.run.resume, run_dir)
        if resume_dir is None:
            return plan
        check_resumable(resume_dir, cfg, world_size, run_dir, num_classes)
        step = int(read_marker(resume_dir).get("step", 0))
        max_steps = cfg.train.max_steps
        if max_steps is not None and step > max_steps:
            raise _beyond_budget_error(run_dir, step, f"train.max_steps={max_steps}")
        plan.update(resume_dir=resume_dir, step=step, completed=max_steps is not None and step == max_steps)
    except Exception as e:  # returned, not raised: the other ranks wait for this answer
        return e
    return plan


def already_completed_message(run_dir: str, step: int, key: str, value: Any) -> str:
    return (f"swinv2-train: {run_dir} already completed its {step} steps ({key}={value}); nothing to do. "
            f"To train on, raise {key}; to start over use run.resume=never or another run.dir=...")


def _beyond_budget_error(run_dir: str, step: int, budget: str) -> ResumeMismatchError:
    return ResumeMismatchError(
        f"{run_dir} holds a checkpoint at step {step}, beyond {budget}: it cannot be resumed to a shorter run. "
        f"Raise the step budget to continue it, or start a new run with another run.dir=... or run.resume=never")


def print_summary(s: Dict[str, Any]) -> None:
    rd = s["run_dir"]
    lines = [f"== swinv2-train {s['stopped']} at step {s['step']} "
             f"(train {s['train_time_s']:.1f} s, wall {s['wall_time_s']:.1f} s) =="]
    if "val/top1" in s:
        lines.append(f"final val top-1 {s['val/top1']:.2f}%  top-5 {s['val/top5']:.2f}%  loss {s['val/loss']:.4f}")
    lines += [f"run dir     {rd}",
              f"checkpoint  {s['checkpoint']}  (resume: same command, run.resume=auto)",
              f"metrics     {os.path.join(rd, 'metrics.jsonl')}"]
    if os.path.isdir(os.path.join(rd, "tensorboard")):
        lines.append(f"tensorboard tensorboard --logdir {os.path.join(rd, 'tensorboard')}")
    if s.get("wandb_dir"):
        lines.append(f"wandb       wandb sync {os.path.dirname(s['wandb_dir'].rstrip('/'))}")
    if s.get("amplitudes_png"):
        lines.append(f"amplitudes  {s['amplitudes_png']}")
    lines.append(f"export      python -m swinv2_train.checkpoint export {rd} OUT.pth"
                 + (f"  (done: {s['export']})" if s.get("export") else ""))
    print("\n".join(lines), flush=True)

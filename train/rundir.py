"""The run directory's layout: every name swinv2-train writes into `run.dir`, and the metric keys
that one module formats and another parses. Nothing else spells these names; the on-disk names
are a format (runs written by earlier versions resume and evaluate), so never rename one.

    RUN_DIR/
      config.yaml                 the resolved config of the latest start (resume checks read it)
      train.log                   Hydra's job log (hydra.job.name=train, hydra.run.dir=run.dir)
      metrics.jsonl               one JSON record per logged step (swinv2_train.metrics)
      tensorboard/  wandb/        the optional loggers' folders; wandb_id keeps the W&B run id
      amplitudes.png              activation amplitude per block (train.probe_every)
      amplitude_report/           swinv2-amplitude-report's figures and summary (by default)
      reconstructions/step_N.png  SimMIM's reconstruction grids (task.recon_every, and the last step)
      profile/                    train.profile_steps: torch.profiler traces (rank{r}_steps_A-B.pt.trace.json)
                                  and, on CUDA, memory snapshots (*.pickle; train.oom_snapshot: oom_*)
      model_official.pth          the export: model_simmim.pth for SimMIM, model_ema_official.pth for the EMA
      keys_rank{r}.jsonl          DEBUG: the sample keys of every step (SWINV2_DEBUG_KEY_TRACE=1)
      checkpoints/step_{N:08d}/   one checkpoint (swinv2_train.checkpoint): DeepSpeed's files,
                                  rng_rank{r}.pt, ema.pt, config.yaml and, last, COMMITTED
      checkpoints.old-{n}/        checkpoints set aside by run.resume=never
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

# ----------------------------------------------------------------------------- run directory files
CONFIG_FILE = "config.yaml"      # in the run dir and in every checkpoint
TRAIN_LOG = "train.log"          # written by Hydra (configs/train.yaml names the job `train`)
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"              # made by wandb itself under dir=RUN_DIR
WANDB_ID_FILE = "wandb_id"
AMPLITUDES_PNG = "amplitudes.png"
AMPLITUDE_REPORT_DIR = "amplitude_report"
RECON_DIR = "reconstructions"
PROFILE_DIR = "profile"          # TensorBoard's profiler plugin reads *.pt.trace.json here
EXPORT_FILE = "model_official.pth"          # the official classification format
SIMMIM_EXPORT_FILE = "model_simmim.pth"     # the official SimMIM format (encoder.*, decoder.0.*)
EMA_EXPORT_FILE = "model_ema_official.pth"  # the EMA of weights, in the run's export format

# ----------------------------------------------------------------------------- checkpoints
CHECKPOINTS = "checkpoints"
MARKER = "COMMITTED"             # written last: a checkpoint folder without it is an interrupted save
UNIVERSAL_DIR = "universal"      # DeepSpeed's world-size independent copy inside a checkpoint
EMA_FILE = "ema.pt"              # the EMA of weights inside a checkpoint (rank 0)
SET_ASIDE_SUFFIX = ".old-{n}"   # run.resume=never moves the earlier checkpoint root to CHECKPOINTS.old-1, -2, ...
SET_ASIDE = CHECKPOINTS + SET_ASIDE_SUFFIX.format(n="N")  # (for messages)
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's module weights + client state
OPTIM_STATES_GLOB = "*zero_pp_rank_*_mp_rank_00_optim_states.pt"  # DeepSpeed's ZeRO partitions, one per rank
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    """The name of step `step`'s checkpoint folder (also of its reconstruction picture)."""
    return f"step_{step:08d}"


def step_of(tag: str) -> Optional[int]:
    """The step a checkpoint folder's name stands for (None: not a checkpoint name)."""
    m = TAG_RE.match(os.path.basename(tag.rstrip("/")))
    return int(m.group(1)) if m else None


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def checkpoint_dirs(ckpt_root: str) -> List[Tuple[int, str, bool]]:
    """[(step, path, committed)] of the checkpoint folders in `ckpt_root`, sorted by step."""
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for name in os.listdir(ckpt_root):
        step, path = step_of(name), os.path.join(ckpt_root, name)
        if step is not None and os.path.isdir(path):
            out.append((step, path, os.path.isfile(os.path.join(path, MARKER))))
    return sorted(out)


def committed_steps(ckpt_root: str) -> List[int]:
    return [step for step, _, committed in checkpoint_dirs(ckpt_root) if committed]


def latest_committed(ckpt_root: str) -> Optional[str]:
    """The newest committed checkpoint folder (its files unchecked), or None."""
    done = [path for _, path, committed in checkpoint_dirs(ckpt_root) if committed]
    return done[-1] if done else None


@dataclass(frozen=True)
class Located:
    """What a path given by a user points at: the run dir, its checkpoint root (the folder of its
    checkpoint folders) and, when the path names one checkpoint, that checkpoint's folder."""

    run_dir: str
    ckpt_root: str
    tag_dir: Optional[str] = None


def locate(path: str, step: Optional[int] = None) -> Located:
    """A step_N folder names itself; a folder named CHECKPOINTS, or one holding step_N folders and
    no CHECKPOINTS folder (e.g. a set-aside one), is a checkpoint root; anything else is a run dir.
    `step` names that step's checkpoint of a run dir or checkpoint root."""
    path = os.path.abspath(path).rstrip("/") or "/"
    if step_of(path) is not None:
        return Located(os.path.dirname(os.path.dirname(path)), os.path.dirname(path), path)
    holds_tags = not os.path.isdir(os.path.join(path, CHECKPOINTS)) and bool(checkpoint_dirs(path))
    if os.path.basename(path) == CHECKPOINTS or holds_tags:
        run_dir, root = os.path.dirname(path), path
    else:
        run_dir, root = path, os.path.join(path, CHECKPOINTS)
    return Located(run_dir, root, os.path.join(root, tag_for(step)) if step is not None else None)


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    path: str

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def ckpt_root(self) -> str:
        """The folder of the run's checkpoint folders."""
        return self.file(CHECKPOINTS)

    def checkpoint(self, step: int) -> str:
        return os.path.join(self.ckpt_root, tag_for(step))

    def set_aside_dir(self, n: int) -> str:
        """The n-th folder that run.resume=never moved earlier checkpoint folders to."""
        return self.ckpt_root + SET_ASIDE_SUFFIX.format(n=n)

    @property
    def config(self) -> str:
        return self.file(CONFIG_FILE)

    @property
    def metrics(self) -> str:
        return self.file(METRICS_FILE)

    @property
    def tensorboard(self) -> str:
        return self.file(TENSORBOARD_DIR)

    @property
    def wandb_id(self) -> str:
        return self.file(WANDB_ID_FILE)

    @property
    def amplitudes_png(self) -> str:
        return self.file(AMPLITUDES_PNG)

    @property
    def amplitude_report(self) -> str:
        return self.file(AMPLITUDE_REPORT_DIR)

    def reconstruction(self, step: int) -> str:
        return os.path.join(self.path, RECON_DIR, f"{tag_for(step)}.png")

    def key_trace(self, rank: int) -> str:
        return self.file(f"keys_rank{rank}.jsonl")

    @property
    def profile(self) -> str:
        return self.file(PROFILE_DIR)

    def profile_trace(self, rank: int, first: int, last: int) -> str:
        """A torch.profiler trace of steps first..last (Chrome/Perfetto JSON; the suffix is the
        one TensorBoard's profiler plugin looks for)."""
        return os.path.join(self.profile, f"rank{rank}_steps_{first}-{last}.pt.trace.json")

    def memory_snapshot(self, rank: int, what: str) -> str:
        """A CUDA memory snapshot (torch.cuda.memory._dump_snapshot; pytorch.org/memory_viz reads it):
        `what` is steps_A-B (train.profile_steps) or oom_step_N (train.oom_snapshot)."""
        return os.path.join(self.profile, f"rank{rank}_memory_{what}.pickle")


def set_aside(run_dir: str) -> Optional[str]:
    """run.resume=never in a run dir that has checkpoint folders: move its checkpoint root to
    the first free SET_ASIDE name, so that the new run starts from nothing and never resumes an
    earlier run's state. Returns the new place (None when there was nothing to move)."""
    run = RunDir(run_dir)
    if not checkpoint_dirs(run.ckpt_root):
        return None
    n = 1
    while os.path.exists(run.set_aside_dir(n)):
        n += 1
    os.replace(run.ckpt_root, run.set_aside_dir(n))
    return run.set_aside_dir(n)


# ----------------------------------------------------------------------------- metric keys
# Formatted by the trainer (swinv2_train.evaluation, the tasks, swinv2_train.amplitudes), parsed by
# swinv2-eval, the end-of-run summary and the report scripts.
VAL = "val/"          # the task's validation metrics: val/loss, val/top1, ...
VAL_EMA = "val_ema/"  # the same with the EMA of weights
VAL_LOSS, VAL_TOP1, VAL_TOP5, VAL_SAMPLES = (f"{VAL}{k}" for k in ("loss", "top1", "top5", "samples"))
AMPLITUDE_STATS = ("mean_abs", "rms", "max")
AMPLITUDE_KEY_RE = re.compile(rf"^amplitude/(\d+)/({'|'.join(AMPLITUDE_STATS)})$")
LOGIT_SCALE_KEY_RE = re.compile(r"^logit_scale/(\d+)$")


AMPLITUDE_IMAGE = "amplitudes"  # the amplitude figure's image key (W&B, TensorBoard)
RECON_IMAGE = "simmim/reconstruction"  # SimMIM's reconstruction grid's image key
BEST_SUFFIX = "_best"
BEST_OF = {VAL_TOP1: max, VAL_LOSS: min}  # the val metrics whose best is kept (summary, checkpoints)


def best_key(key: str) -> str:
    """val/top1 -> val/top1_best: the best value of `key` over the run's evaluations."""
    return key + BEST_SUFFIX


def best_of(best: dict, val: dict) -> dict:
    """`best` updated with one evaluation's metrics `val` ({best_key(k): value})."""
    out = dict(best)
    for key, pick in BEST_OF.items():
        if key in val:
            out[best_key(key)] = pick(val[key], out.get(best_key(key), val[key]))
    return out


def val_key(name: str) -> str:
    return f"{VAL}{name}"


def ema_key(key: str) -> str:
    """The EMA's name of a task metric: val/top1 -> val_ema/top1, anything else under ema/."""
    return f"{VAL_EMA}{key[len(VAL):]}" if key.startswith(VAL) else f"ema/{key}"


def amplitude_key(block: int, stat: str) -> str:
    """amplitude/NN/stat: the activation `stat` of block NN (swinv2.iter_blocks order)."""
    return f"amplitude/{block:02d}/{stat}"


def logit_scale_key(block: int) -> str:
    return f"logit_scale/{block:02d}"

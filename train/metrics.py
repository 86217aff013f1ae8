"""One logging interface for W&B, TensorBoard and metrics.jsonl; rank 0 logs, the rest no-op.

W&B runs offline by default (no network); files go to the run dir's wandb/ (names:
swinv2_train.rundir). The run id is kept in the run dir's wandb_id (and in the checkpoint's client
state), so a resumed run continues the same W&B run with resume="allow". The run is named after
run.name, grouped by experiment and tagged with variant, task and resolution (`WandbIdentity`);
val metrics plot against the step and against train/samples_seen (define_metric); images (the
amplitude figure, SimMIM's reconstructions) go to W&B and TensorBoard alike.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .rundir import VAL, VAL_EMA, RunDir

SAMPLES_SEEN = "train/samples_seen"  # the second x axis of the val metrics in W&B

log = logging.getLogger(__name__)


class NullLogger:
    """What non-zero ranks get: every call is a no-op, so call sites need no rank checks."""

    wandb_id: Optional[str] = None
    wandb_dir: Optional[str] = None

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        pass

    def summary(self, metrics: Dict[str, Any]) -> None:
        pass

    def log_image(self, name: str, image: Any, step: int) -> None:
        """`image`: (H, W, 3) uint8 array."""

    def close(self) -> None:
        pass


def _scalar(v: Any) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class WandbIdentity:
    """How the W&B run is found on the dashboard: its name, its group and its tags."""

    name: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)

    @classmethod
    def of(cls, spec, experiment: Optional[str] = None) -> "WandbIdentity":
        """logger.wandb.name (default run.name), logger.wandb.group (default `experiment`, else
        run.name), and logger.wandb.tags plus the model variant, the task and the resolution."""
        w = spec.logger.wandb
        auto = [spec.variant, spec.task.name, f"{spec.model.img_size}px"]
        return cls(name=w.name or spec.run.name, group=w.group or experiment or spec.run.name,
                   tags=list(dict.fromkeys([*w.tags, *auto])))


class MetricLogger(NullLogger):
    def __init__(self, run_dir: str, cfg, wandb_id: Optional[str] = None, config: Optional[dict] = None,
                 identity: Optional[WandbIdentity] = None):
        self.run_dir = run_dir
        run = RunDir(run_dir)
        self._jsonl = open(run.metrics, "a") if cfg.jsonl else None
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(run.tensorboard)
        self._wandb = None
        self.wandb_id = None
        if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            self._init_wandb(cfg.wandb, wandb_id, config, identity or WandbIdentity(cfg.wandb.name, None,
                                                                                     list(cfg.wandb.tags)))

    def _init_wandb(self, wcfg, wandb_id: Optional[str], config: Optional[dict], identity: WandbIdentity) -> None:
        import wandb

        id_file = RunDir(self.run_dir).wandb_id
        if wandb_id is None and os.path.exists(id_file):
            wandb_id = open(id_file).read().strip() or None
        self.wandb_id = wandb_id or secrets.token_hex(4)
        with open(id_file, "w") as f:
            f.write(self.wandb_id)
        os.environ["WANDB_DIR"] = self.run_dir  # wandb/ (offline-run-*) inside the run dir
        self._wandb = wandb.init(
            project=wcfg.project, entity=wcfg.entity, name=identity.name, group=identity.group,
            tags=identity.tags, id=self.wandb_id, resume="allow", mode=wcfg.mode, dir=self.run_dir,
            config=config, settings=wandb.Settings(console="off", x_disable_stats=True))
        self.wandb_dir = self._wandb.dir
        # val metrics against samples seen (logged beside them); W&B's own step axis stays available
        self._wandb.define_metric(SAMPLES_SEEN)
        for prefix in (VAL, VAL_EMA):
            self._wandb.define_metric(f"{prefix}*", step_metric=SAMPLES_SEEN)

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        clean = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        if self._jsonl is not None:
            # NaN/inf are written as strings: strict JSON readers reject bare NaN
            rec = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
            self._jsonl.write(json.dumps(rec) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def log_image(self, name: str, image: Any, step: int) -> None:
        if self._tb is not None:
            self._tb.add_image(name, image, step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(image)}, step=step)

    def summary(self, metrics: Dict[str, Any]) -> None:
        if self._wandb is not None:
            for k, v in metrics.items():
                self._wandb.summary[k] = v

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def build_logger(rank: int, run_dir: str, cfg, wandb_id: Optional[str] = None,
                 config: Optional[dict] = None, identity: Optional[WandbIdentity] = None) -> NullLogger:
    return MetricLogger(run_dir, cfg, wandb_id, config, identity) if rank == 0 else NullLogger()


def read_jsonl(path: str):
    """Records of a metrics.jsonl (NaN/inf strings turned back into floats)."""
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out.append({k: (float(v) if v in ("nan", "inf", "-inf") else v) for k, v in rec.items()})
    return out

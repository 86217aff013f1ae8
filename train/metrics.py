"""One logging interface for W&B, TensorBoard and metrics.jsonl; rank 0 logs, the rest no-op.

W&B runs offline by default (no network); files go to the run dir's wandb/ (names:
swinv2_train.rundir). The run id is kept in the run dir's wandb_id (and in the checkpoint's client
state), so a resumed run continues the same W&B run with resume="allow".
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
from typing import Any, Dict, Optional

from .rundir import RunDir

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


class MetricLogger(NullLogger):
    def __init__(self, run_dir: str, cfg, wandb_id: Optional[str] = None, config: Optional[dict] = None):
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
            self._init_wandb(cfg.wandb, wandb_id, config)

    def _init_wandb(self, wcfg, wandb_id: Optional[str], config: Optional[dict]) -> None:
        import wandb

        id_file = RunDir(self.run_dir).wandb_id
        if wandb_id is None and os.path.exists(id_file):
            wandb_id = open(id_file).read().strip() or None
        self.wandb_id = wandb_id or secrets.token_hex(4)
        with open(id_file, "w") as f:
            f.write(self.wandb_id)
        os.environ["WANDB_DIR"] = self.run_dir  # wandb/ (offline-run-*) inside the run dir
        self._wandb = wandb.init(
            project=wcfg.project, entity=wcfg.entity, name=wcfg.name, tags=list(wcfg.tags),
            id=self.wandb_id, resume="allow", mode=wcfg.mode, dir=self.run_dir, config=config,
            settings=wandb.Settings(console="off", x_disable_stats=True))
        self.wandb_dir = self._wandb.dir

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
                 config: Optional[dict] = None) -> NullLogger:
    return MetricLogger(run_dir, cfg, wandb_id, config) if rank == 0 else NullLogger()


def read_jsonl(path: str):
    """Records of a metrics.jsonl (NaN/inf strings turned back into floats)."""
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out.append({k: (float(v) if v in ("nan", "inf", "-inf") else v) for k, v in rec.items()})
    return out

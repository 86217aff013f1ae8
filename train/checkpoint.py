"""Checkpoints with commit markers, auto-resume and export to the official weight format.

Layout: RUN_DIR/checkpoints/step_{N:08d}/ holds DeepSpeed's files (every rank writes its ZeRO
partition), `rng_rank{r}.pt` (each rank's RNG states) and, last, `COMMITTED`. Rank 0 writes the
marker (temp file + os.replace) only after a barrier that every rank reaches after its own
writes, so a directory without the marker is an interrupted save and is never loaded.

CLI: python -m swinv2_train.checkpoint export RUN_DIR [--step N] OUT.pth
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import random
import re
import shutil
import sys
import time
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from swinv2_train.errors import CheckpointError, ResumeMismatchError

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
CONFIG_FILE = "config.yaml"  # the resolved config that wrote the checkpoint (checked on resume)
# SwinV2Config fields that leave the weights and their shapes alone: free to change on resume
FREE_MODEL_FIELDS = ("drop_rate", "attn_drop_rate", "drop_path_rate", "attention", "sequential_chunk")
_TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- RNG
def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- discovery
def list_checkpoints(ckpt_root: str) -> List[Tuple[int, str, bool]]:
    """[(step, path, committed)] sorted by step."""
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for name in os.listdir(ckpt_root):
        m = _TAG_RE.match(name)
        path = os.path.join(ckpt_root, name)
        if m and os.path.isdir(path):
            out.append((int(m.group(1)), path, os.path.isfile(os.path.join(path, MARKER))))
    return sorted(out)


def latest_committed(ckpt_root: str) -> Optional[str]:
    done = [p for _, p, c in list_checkpoints(ckpt_root) if c]
    return done[-1] if done else None


def resolve_resume(resume: str, run_dir: str) -> Optional[str]:
    """Tag directory to resume from: `auto` (newest committed in the run dir or None), `never`,
    or a path (a tag directory, a checkpoints directory or a run directory)."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_committed(os.path.join(run_dir, "checkpoints"))
    path = os.path.abspath(resume)
    if _TAG_RE.match(os.path.basename(path.rstrip("/"))):
        if not os.path.isfile(os.path.join(path, MARKER)):
            raise CheckpointError(f"run.resume={resume}: no {MARKER} marker (an interrupted save?); "
                                  "give a committed checkpoint, or run.resume=auto|never")
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        found = latest_committed(root)
        if found:
            return found
    raise CheckpointError(f"run.resume={resume}: no committed checkpoint there; give a run dir, its "
                          "checkpoints/ or a step_N directory, or run.resume=auto|never")


def read_marker(tag_dir: str) -> Dict[str, Any]:
    with open(os.path.join(tag_dir, MARKER)) as f:
        return json.load(f)


def saved_config(tag_dir: str) -> Optional[Dict[str, Any]]:
    """The resolved config a checkpoint was written with: its config.yaml; for checkpoints older
    than that file, the client state in the model-states file (memory-mapped, weights not read)."""
    from omegaconf import OmegaConf

    path = os.path.join(tag_dir, CONFIG_FILE)
    if os.path.isfile(path):
        return OmegaConf.to_container(OmegaConf.load(path))
    states = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(states):
        return None
    return torch.load(states, map_location="cpu", mmap=True, weights_only=False).get("config")


def unreadable_files(tag_dir: str) -> List[Tuple[str, str]]:
    """[(file, reason)] of checkpoint files that are not complete torch archives. torch.save
    writes zip archives whose directory sits at the end, so a truncated or partly copied file
    fails here after reading a few KiB, long before DeepSpeed would load it."""
    bad = []
    for path in sorted(glob.glob(os.path.join(tag_dir, "*.pt"))):
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError) as e:
            bad.append((path, str(e) or type(e).__name__))
    return bad


def _shape_fields(cfg: Any, num_classes: int) -> Dict[str, Any]:
    """The fields of the model's effective SwinV2Config that determine its state dict, named by
    their config keys (the class count is data.num_classes, resolved from the data source)."""
    from omegaconf import OmegaConf

    from swinv2.config import SwinV2Config
    from swinv2_train.config import model_kwargs

    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    kw = model_kwargs(cfg.model, num_classes)
    effective = SwinV2Config.from_variant(kw.pop("variant"), **kw).to_dict()
    out = {("data.num_classes" if k == "num_classes" else f"model.{k}"): v
           for k, v in effective.items() if k not in FREE_MODEL_FIELDS}
    out["train.precision"] = cfg.train.precision  # ZeRO's optimizer files differ per precision
    return out


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def resume_mismatches(saved_cfg: Optional[Dict[str, Any]], saved_world: Optional[int],
                      cfg: Any, world_size: int, num_classes: int) -> List[str]:
    """What differs between a checkpoint and this run, as 'key checkpoint -> now' strings.
    `num_classes`: this run's class count; the checkpoint's config holds its resolved count
    (not stored by older checkpoints: then not compared)."""
    diffs = []
    then = None
    if saved_cfg is not None:
        saved_classes = (saved_cfg.get("data") or {}).get("num_classes") or num_classes
        try:
            then = _shape_fields(saved_cfg, saved_classes)
        except Exception as e:  # noqa: BLE001 - a config of an older schema: DeepSpeed's load decides
            log.warning("cannot compare the checkpoint's model config with this run's (%s)", e)
    if then is not None:
        now = _shape_fields(cfg, num_classes)
        diffs += [f"{k} {_plain(then[k])} -> {_plain(now[k])}" for k in now
                  if k in then and _plain(then[k]) != _plain(now[k])]
    if saved_world is not None and saved_world != world_size:
        diffs.append(f"world size {saved_world} -> {world_size} (ZeRO optimizer state is partitioned per rank)")
    return diffs


def check_resumable(tag_dir: str, cfg: Any, world_size: int, run_dir: str, num_classes: int) -> None:
    """Raise CheckpointError / ResumeMismatchError when `tag_dir` cannot be resumed by this run.
    Cheap file reads only: called on rank 0 before the model and the engine exist."""
    ways_out = (f"start a new run with another run.dir=..., or start over in {run_dir} with "
                "run.resume=never (its checkpoints are moved to checkpoints.old-N)")
    bad = unreadable_files(tag_dir)
    if bad:
        path, reason = bad[0]
        raise CheckpointError(
            f"checkpoint {tag_dir} is damaged: {os.path.basename(path)} cannot be read ({reason}; truncated or "
            f"partly copied?). Move that directory away to resume from the previous checkpoint, or {ways_out}")
    try:
        marker, saved = read_marker(tag_dir), saved_config(tag_dir)
    except Exception as e:  # noqa: BLE001 - unreadable marker / config: a damaged checkpoint
        raise CheckpointError(f"checkpoint {tag_dir} cannot be read ({type(e).__name__}: {e}). Move that "
                              f"directory away to resume from the previous checkpoint, or {ways_out}") from e
    diffs = resume_mismatches(saved, marker.get("world_size"), cfg, world_size, num_classes)
    if diffs:
        raise ResumeMismatchError(f"cannot resume from {tag_dir}: it was written by a different setup: "
                                  f"{'; '.join(diffs)} (checkpoint -> now). Either {ways_out}")


def set_aside_checkpoints(run_dir: str) -> Optional[str]:
    """run.resume=never in a run dir that has checkpoints: move them to checkpoints.old-N, so
    that neither auto-resume nor pruning ever mixes them with the new run's. Returns the new
    place (None when there was nothing to move)."""
    root = os.path.join(run_dir, "checkpoints")
    if not list_checkpoints(root):
        return None
    n = 1
    while os.path.exists(f"{root}.old-{n}"):
        n += 1
    os.replace(root, f"{root}.old-{n}")
    return f"{root}.old-{n}"


# ----------------------------------------------------------------------------- manager
class CheckpointManager:
    def __init__(self, run_dir: str, keep: int, rank: int, world_size: int):
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep, self.rank, self.world_size = keep, rank, world_size
        self.loaded_step: Optional[int] = None  # the checkpoint this run resumed from

    def save(self, engine, step: int, client_state: Dict[str, Any],
             extra_rng: Optional[Dict[str, Any]] = None) -> str:
        """Collective: every rank calls it. `extra_rng` (e.g. a mixup generator state) is stored
        with this rank's RNG states. Returns the committed tag directory."""
        import torch.distributed as dist

        tag = tag_for(step)
        path = os.path.join(self.root, tag)
        if step == self.loaded_step and os.path.isfile(os.path.join(path, MARKER)):
            return path  # e.g. preempted right after resuming: the state on disk is this one
        if self.rank == 0 and os.path.isdir(path):  # debris of an interrupted save, or a stale one
            shutil.rmtree(path)
        if dist.is_initialized():
            dist.barrier()
        client_state = dict(client_state, step=step, world_size=self.world_size)
        engine.save_checkpoint(self.root, tag=tag, client_state=client_state, save_latest=False)
        _atomic_torch_save({**rng_state(), **(extra_rng or {})}, os.path.join(path, f"rng_rank{self.rank}.pt"))
        if dist.is_initialized():
            dist.barrier()  # every rank's files are on disk before the marker exists
        if self.rank == 0:
            config = client_state.get("config")
            if config is not None:
                from omegaconf import OmegaConf
                _atomic_write(os.path.join(path, CONFIG_FILE), OmegaConf.to_yaml(OmegaConf.create(config)).encode())
            _atomic_write(os.path.join(path, MARKER),
                          json.dumps({"step": step, "world_size": self.world_size,
                                      "time": time.time()}).encode())
            self.prune()
        if dist.is_initialized():
            dist.barrier()
        return path

    def prune(self) -> None:
        """Keep the newest `keep` committed checkpoints; drop uncommitted debris older than the newest."""
        ckpts = list_checkpoints(self.root)
        committed = [(s, p) for s, p, c in ckpts if c]
        if not committed:
            return
        newest = committed[-1][0]
        doomed = [p for _, p in committed[:-self.keep]]
        doomed += [p for s, p, c in ckpts if not c and s < newest]
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)

    def load(self, engine, tag_dir: str) -> Dict[str, Any]:
        """Load weights + optimizer state into the engine; return client state (rng not applied)."""
        root, tag = os.path.split(tag_dir.rstrip("/"))
        marker = read_marker(tag_dir)
        if marker.get("world_size", self.world_size) != self.world_size:
            raise ResumeMismatchError(
                f"{tag_dir} was saved with world size {marker['world_size']}, this run has "
                f"{self.world_size}: ZeRO optimizer state cannot be re-partitioned; relaunch with "
                f"{marker['world_size']} ranks, convert it with python -m deepspeed.checkpoint.ds_to_universal "
                "or start from exported weights")
        try:
            path, client = engine.load_checkpoint(root, tag=tag)
            if path is None:
                raise RuntimeError("DeepSpeed found no checkpoint files")
            rng_file = os.path.join(tag_dir, f"rng_rank{self.rank}.pt")
            client["rng"] = torch.load(rng_file, weights_only=False) if os.path.exists(rng_file) else None
        except (RuntimeError, OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"cannot load checkpoint {tag_dir} ({reason}): damaged, or written by another "
                                  "setup; move it away to resume from the previous checkpoint, or use another "
                                  "run.dir=... / run.resume=never") from e
        self.loaded_step = int(marker.get("step", client.get("step", -1)))
        return client


# ----------------------------------------------------------------------------- export
def fp32_state_dict(tag_dir: str) -> Dict[str, torch.Tensor]:
    """Full fp32 weights (+ buffers) of a checkpoint, from the ZeRO-1/2 fp32 master partitions.

    Each rank's optimizer file holds its slice of one flat fp32 vector per parameter group
    (padding only at the end); `param_shapes` in the model file gives the order. Same result as
    DeepSpeed's zero_to_fp32 for fp32 runs, and it also reads bf16 runs (BF16_Optimizer files,
    which zero_to_fp32 rejects), where the module weights themselves are only bf16.
    """
    ms = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    files = glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    files.sort(key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f).group(1)))
    parts = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
             ["single_partition_of_fp32_groups"] for f in files]
    out = {k: v for k, v in ms["module"].items()}  # buffers (and params, replaced below)
    for g, shapes in enumerate(ms["param_shapes"]):
        flat, off = torch.cat([p[g].flatten() for p in parts]), 0
        for name, shape in shapes.items():
            out[name] = flat[off:off + shape.numel()].view(shape).clone()
            off += shape.numel()
    return out


def export(run_dir: str, out: str, step: Optional[int] = None) -> str:
    """Write the official-format state dict ({"model": fp32 state dict}) of a committed checkpoint."""
    from swinv2.weights import save_official_state_dict

    root = os.path.join(run_dir, "checkpoints")
    if step is None:
        tag_dir = latest_committed(root)
        if tag_dir is None:
            raise FileNotFoundError(f"no committed checkpoint in {root}")
    else:
        tag_dir = os.path.join(root, tag_for(step))
        if not os.path.isfile(os.path.join(tag_dir, MARKER)):
            raise FileNotFoundError(f"{tag_dir} is missing or not committed")
    save_official_state_dict(fp32_state_dict(tag_dir), out)
    return tag_dir


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m swinv2_train.checkpoint")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="official-format fp32 weights from a run's checkpoint")
    e.add_argument("run_dir")
    e.add_argument("out")
    e.add_argument("--step", type=int, default=None, help="default: newest committed")
    a = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    tag_dir = export(a.run_dir, a.out, a.step)
    print(f"exported {tag_dir} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

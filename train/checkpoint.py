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
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
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
            raise FileNotFoundError(f"run.resume={resume}: no {MARKER} marker (interrupted save?)")
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        found = latest_committed(root)
        if found:
            return found
    raise FileNotFoundError(f"run.resume={resume}: no committed checkpoint there")


# ----------------------------------------------------------------------------- manager
class CheckpointManager:
    def __init__(self, run_dir: str, keep: int, rank: int, world_size: int):
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep, self.rank, self.world_size = keep, rank, world_size

    def save(self, engine, step: int, client_state: Dict[str, Any],
             extra_rng: Optional[Dict[str, Any]] = None) -> str:
        """Collective: every rank calls it. `extra_rng` (e.g. a mixup generator state) is stored
        with this rank's RNG states. Returns the committed tag directory."""
        import torch.distributed as dist

        tag = tag_for(step)
        path = os.path.join(self.root, tag)
        if os.path.isfile(os.path.join(path, MARKER)):  # already committed (re-run of a finished run)
            return path
        if self.rank == 0 and os.path.isdir(path):  # debris of an earlier interrupted save
            shutil.rmtree(path)
        if dist.is_initialized():
            dist.barrier()
        client_state = dict(client_state, step=step, world_size=self.world_size)
        engine.save_checkpoint(self.root, tag=tag, client_state=client_state, save_latest=False)
        _atomic_torch_save({**rng_state(), **(extra_rng or {})}, os.path.join(path, f"rng_rank{self.rank}.pt"))
        if dist.is_initialized():
            dist.barrier()  # every rank's files are on disk before the marker exists
        if self.rank == 0:
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
        marker = json.load(open(os.path.join(tag_dir, MARKER)))
        if marker.get("world_size", self.world_size) != self.world_size:
            raise RuntimeError(
                f"{tag_dir} was saved with world size {marker['world_size']}, this run has "
                f"{self.world_size}: ZeRO optimizer state cannot be re-partitioned; convert it with "
                "python -m deepspeed.checkpoint.ds_to_universal or start from exported weights")
        path, client = engine.load_checkpoint(root, tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {tag_dir}")
        rng_file = os.path.join(tag_dir, f"rng_rank{self.rank}.pt")
        client["rng"] = torch.load(rng_file, weights_only=False) if os.path.exists(rng_file) else None
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

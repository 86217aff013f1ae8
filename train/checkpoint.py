"""Checkpoints with commit markers, auto-resume and export to the official weight format.

Layout (swinv2_train.rundir): a checkpoint folder `step_{N:08d}` holds DeepSpeed's files (every
rank writes its ZeRO partition), `rng_rank{r}.pt` (each rank's RNG states), `ema.pt` (rank 0, with
train.ema_decay), `config.yaml` and, last, `COMMITTED`.
Rank 0 writes the marker (temp file + os.replace) only after a barrier that every rank reaches
after its own writes, so a directory without the marker is an interrupted save and is never
loaded. The marker records every file's size and CRC-32: resume verifies them and falls back to
the newest intact checkpoint. A checkpoint resumed at another world size is converted once to
DeepSpeed's universal format (`step_N/universal/`, world-size independent) and loaded from there.

CLI: python -m swinv2_train.checkpoint export RUN_DIR [--step N] [--ema] OUT.pth
     python -m swinv2_train.checkpoint verify RUN_DIR
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
import subprocess
import sys
import time
import zipfile
import zlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import CheckpointError, ResumeMismatchError
from .rundir import (CONFIG_FILE, EMA_FILE, MARKER, MODEL_STATES_FILE, OPTIM_STATES_GLOB, SET_ASIDE, UNIVERSAL_DIR,
                     Located, RunDir, checkpoint_dirs, committed_steps, locate, rng_file, tag_for)
from .rundir import latest_committed  # noqa: F401  (callers of this module's earlier home of it)

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------- path -> checkpoint
def find_checkpoint(path: str, step: Optional[int] = None, way_out: str = "") -> Tuple[Located, Optional[str]]:
    """The one rule that turns a path (+ an optional step) into a checkpoint folder, for resuming,
    swinv2-eval and the export:

    * a named checkpoint (a step_N folder, or `step` of a run dir or checkpoint root) is taken
      as named: it must be committed and intact, nothing is substituted;
    * a run dir or checkpoint root (rundir.locate) means its newest intact committed checkpoint: newer damaged
      ones are skipped with a warning, and when every committed one is damaged that is an error.

    Returns (what the path points at, the checkpoint folder); the folder is None when a run dir
    has no committed checkpoint (the caller decides whether that is an error). Failures are
    CheckpointErrors ending in `way_out` (the command's advice). Reads every file of the chosen
    checkpoint: call it on one rank and share the answer (the trainer's resume plan does)."""
    where = locate(path, step)
    if where.tag_dir is not None:
        return where, _named_checkpoint(where, way_out)
    return where, newest_intact(where.ckpt_root, way_out)


def _named_checkpoint(where: Located, way_out: str) -> str:
    tag_dir = where.tag_dir
    if not os.path.isfile(os.path.join(tag_dir, MARKER)):
        state = (f"not committed (no {MARKER} marker: an interrupted save)" if os.path.isdir(tag_dir)
                 else "no such checkpoint")
        raise CheckpointError(f"{tag_dir}: {state}; committed steps here: "
                              f"{committed_steps(where.ckpt_root) or 'none'}; {way_out}")
    damage = damaged_files(tag_dir)
    if damage:
        raise CheckpointError(f"checkpoint {tag_dir} is damaged: {_describe(damage)}; {way_out}")
    return tag_dir


def newest_intact(ckpt_root: str, way_out: str = "") -> Optional[str]:
    """The newest committed checkpoint whose files match its marker (None: no committed one).
    Newer damaged ones are named in a warning; when every one is damaged, a CheckpointError."""
    damaged = []
    for _, path, committed in reversed(checkpoint_dirs(ckpt_root)):
        if not committed:
            continue
        damage = damaged_files(path)
        if not damage:
            for bad, what in damaged:
                log.warning("checkpoint %s is damaged: %s; taking the previous intact checkpoint %s",
                            bad, _describe(what), path)
            return path
        damaged.append((path, damage))
    if not damaged:
        return None
    newest, damage = damaged[0]
    older = f" (and the {len(damaged) - 1} older ones are damaged too)" if len(damaged) > 1 else ""
    raise CheckpointError(f"checkpoint {newest} is damaged: {_describe(damage)}{older}; no intact checkpoint "
                          f"is left in {ckpt_root}; {way_out}")


def resume_way_out(run_dir: str) -> str:
    """What to do when a run cannot resume its checkpoint."""
    return (f"start a new run with another run.dir=..., or start over in {run_dir} with run.resume=never "
            f"(its checkpoint folders are moved to {SET_ASIDE})")


def resolve_resume(resume: str, run_dir: str) -> Optional[str]:
    """Checkpoint folder to resume from (find_checkpoint's rule): `auto` (the run dir's newest
    intact one, or None), `never` (None), or a path (a step_N folder, a checkpoint root or a
    run dir)."""
    if resume == "never":
        return None
    explicit = resume != "auto"
    way_out = ("give another checkpoint (or its run dir: the newest intact one is taken), run.resume=auto or "
               "run.resume=never"
               if explicit else resume_way_out(run_dir))
    try:
        _, tag_dir = find_checkpoint(resume if explicit else run_dir, way_out=way_out)
    except CheckpointError as e:
        raise CheckpointError(f"run.resume={resume}: {e}" if explicit else str(e)) from None
    if tag_dir is None and explicit:
        raise CheckpointError(f"run.resume={resume}: no committed checkpoint there; give a run dir, its "
                              "checkpoint folder or a step_N folder, or run.resume=auto|never")
    return tag_dir


def read_marker(tag_dir: str) -> Dict[str, Any]:
    with open(os.path.join(tag_dir, MARKER)) as f:
        return json.load(f)


def saved_config(tag_dir: str) -> Optional[Dict[str, Any]]:
    """The resolved config a checkpoint was written with: its config.yaml; for a checkpoint older
    than that file, the client state in the model-states file (memory-mapped, weights not read)."""
    from omegaconf import OmegaConf

    path = os.path.join(tag_dir, CONFIG_FILE)
    if os.path.isfile(path):
        return OmegaConf.to_container(OmegaConf.load(path))
    states = os.path.join(tag_dir, MODEL_STATES_FILE)
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


# ----------------------------------------------------------------------------- integrity
# Every file's size and CRC-32 go into the marker. CRC-32 (zlib, streamed) is the cheapest
# checksum in the standard library (~0.7 s/GB here, blake2b ~1.8 s/GB) and what is needed: it
# catches truncation, partial copies and flipped bits, not deliberate tampering.
_CHUNK = 16 << 20


def file_entry(path: str) -> Dict[str, Any]:
    """{"size", "crc32"} of one file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def _file_problem(path: str, saved: Dict[str, Any]) -> Optional[str]:
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return "missing"
    if size != saved["size"]:
        return f"{size} bytes, {saved['size']} when saved (truncated or partly copied?)"
    if file_entry(path)["crc32"] != saved["crc32"]:
        return "its content changed since it was saved (CRC-32 differs)"
    return None


def damaged_files(tag_dir: str) -> List[Tuple[str, str]]:
    """[(file name, what is wrong)] of a committed checkpoint, checked against the sizes and
    checksums in its marker. Markers older than those fields: the torch files are checked to
    be complete archives (what can be verified without them)."""
    try:
        listed = read_marker(tag_dir).get("files")
    except (OSError, ValueError) as e:
        return [(MARKER, f"unreadable ({type(e).__name__}: {e})")]
    if listed is None:
        return [(os.path.basename(path), reason) for path, reason in unreadable_files(tag_dir)]
    found = ((name, _file_problem(os.path.join(tag_dir, name), saved)) for name, saved in sorted(listed.items()))
    return [(name, problem) for name, problem in found if problem]


def write_marker(tag_dir: str, step: int, world_size: int, files: Dict[str, Dict[str, Any]]) -> None:
    """Commit a checkpoint whose files are all written and summed."""
    _atomic_write(os.path.join(tag_dir, MARKER), json.dumps(
        {"step": step, "world_size": world_size, "time": time.time(), "files": files}, indent=1).encode())


def _describe(damage: List[Tuple[str, str]]) -> str:
    return "; ".join(f"{name} {problem}" for name, problem in damage)


def _sum_files_together(tag_dir: str, rank: int, world_size: int) -> Dict[str, Dict[str, Any]]:
    """{file: entry} of every file in `tag_dir`, each rank checksumming a round-robin share
    (a multi-GB checkpoint is summed in 1/world_size of the time). Collective; call it after
    the barrier that follows every rank's writes. The names are the union of every rank's
    listing, so a rank whose view of a shared directory lags still gets every file summed."""
    import torch.distributed as dist

    def gather(obj):
        if not dist.is_initialized():
            return [obj]
        out = [None] * world_size
        dist.all_gather_object(out, obj)
        return out

    mine = [n for n in os.listdir(tag_dir) if os.path.isfile(os.path.join(tag_dir, n))
            and n not in (MARKER, CONFIG_FILE) and ".tmp" not in n]
    names = sorted(set().union(*gather(mine)))
    share = {n: file_entry(os.path.join(tag_dir, n)) for n in names[rank::world_size]}
    return {n: e for part in gather(share) for n, e in part.items()}


def _shape_fields(cfg: Any, num_classes: int) -> Dict[str, Any]:
    """The fields of the model's effective SwinV2Config that determine its state dict, named by
    their config keys (the class count is data.num_classes, resolved from the data source)."""
    from omegaconf import OmegaConf

    from swinv2.config import RUNTIME_FIELDS, SwinV2Config
    from .config import model_kwargs

    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    kw = model_kwargs(cfg.model, num_classes)
    effective = SwinV2Config.from_variant(kw.pop("variant"), **kw).to_dict()
    out = {("data.num_classes" if k == "num_classes" else f"model.{k}"): v
           for k, v in effective.items() if k not in RUNTIME_FIELDS}  # free to change on resume
    out["train.precision"] = cfg.train.precision  # ZeRO's optimizer files differ per precision
    return out


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def resume_mismatches(saved_cfg: Optional[Dict[str, Any]], cfg: Any, num_classes: int) -> List[str]:
    """What differs between a checkpoint and this run, as 'key checkpoint -> now' strings.
    `num_classes`: this run's class count; the checkpoint's config holds its resolved count
    (not stored by an older checkpoint: then not compared). The world size is free to change."""
    then = None
    if saved_cfg is not None:
        saved_classes = (saved_cfg.get("data") or {}).get("num_classes") or num_classes
        try:
            then = _shape_fields(saved_cfg, saved_classes)
        except Exception as e:  # noqa: BLE001 - a config of an older schema: DeepSpeed's load decides
            log.warning("cannot compare the checkpoint's model config with this run's (%s)", e)
    if then is None:
        return []
    now = _shape_fields(cfg, num_classes)
    return [f"{k} {_plain(then[k])} -> {_plain(now[k])}" for k in now
            if k in then and _plain(then[k]) != _plain(now[k])]


def check_resumable(tag_dir: str, cfg: Any, world_size: int, run_dir: str, num_classes: int) -> None:
    """Raise CheckpointError / ResumeMismatchError when `tag_dir` (verified by resolve_resume)
    cannot be resumed by this run; warn when it was written at another world size (it resumes,
    but not as an exact continuation). Cheap file reads only: called on rank 0 before the model
    and the engine exist."""
    ways_out = resume_way_out(run_dir)
    try:
        marker, saved = read_marker(tag_dir), saved_config(tag_dir)
    except Exception as e:  # noqa: BLE001 - unreadable marker / config: a damaged checkpoint
        raise CheckpointError(f"checkpoint {tag_dir} cannot be read ({type(e).__name__}: {e}). Move that "
                              f"directory away to resume from the previous checkpoint, or {ways_out}") from e
    diffs = resume_mismatches(saved, cfg, num_classes)
    if diffs:
        raise ResumeMismatchError(f"cannot resume from {tag_dir}: it was written by a different setup: "
                                  f"{'; '.join(diffs)} (checkpoint -> now). Either {ways_out}")
    saved_world = marker.get("world_size", world_size)
    if saved_world != world_size:
        log.warning("%s was written by %d ranks, this run has %d: its weights and optimizer state carry over "
                    "exactly (through DeepSpeed's universal checkpoint format), the per-rank random streams "
                    "do not; only the same world size continues exactly as an uninterrupted run",
                    tag_dir, saved_world, world_size)


# ----------------------------------------------------------------------------- manager
class CheckpointManager:
    def __init__(self, run_dir: str, keep: int, rank: int, world_size: int):
        self.root = RunDir(run_dir).ckpt_root
        self.keep, self.rank, self.world_size = keep, rank, world_size
        self.loaded_step: Optional[int] = None  # the checkpoint this run resumed from

    def save(self, engine, step: int, client_state: Dict[str, Any],
             extra_rng: Optional[Dict[str, Any]] = None, rank0_files: Optional[Dict[str, Any]] = None) -> str:
        """Collective: every rank calls it. `extra_rng` (e.g. a mixup generator state) is stored
        with this rank's RNG states; `rank0_files` ({file name: object}, e.g. the EMA's ema.pt)
        are torch-saved by rank 0 into the tag folder, summed in the marker like every file there.
        Returns the committed tag directory."""
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
        _atomic_torch_save({**rng_state(), **(extra_rng or {})}, os.path.join(path, rng_file(self.rank)))
        for name, obj in (rank0_files or {}).items() if self.rank == 0 else ():
            _atomic_torch_save(obj, os.path.join(path, name))
        if dist.is_initialized():
            dist.barrier()  # every rank's files are on disk before they are summed and the marker exists
        files = _sum_files_together(path, self.rank, self.world_size)
        if self.rank == 0:
            config = client_state.get("config")
            if config is not None:
                from omegaconf import OmegaConf
                config_path = os.path.join(path, CONFIG_FILE)
                _atomic_write(config_path, OmegaConf.to_yaml(OmegaConf.create(config)).encode())
                files[CONFIG_FILE] = file_entry(config_path)
            write_marker(path, step, self.world_size, files)
            self.prune()
        if dist.is_initialized():
            dist.barrier()
        return path

    def prune(self) -> None:
        """Keep the newest `keep` committed checkpoint folders; drop uncommitted debris older than the newest."""
        ckpts = checkpoint_dirs(self.root)
        committed = [(s, p) for s, p, c in ckpts if c]
        if not committed:
            return
        newest = committed[-1][0]
        doomed = [p for _, p in committed[:-self.keep]]
        doomed += [p for s, p, c in ckpts if not c and s < newest]
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)

    def load(self, engine, tag_dir: str) -> Dict[str, Any]:
        """Load weights + optimizer state into the engine; return the client state with this
        rank's RNG states under "rng" (not applied). Collective. A checkpoint of another world
        size goes through DeepSpeed's universal format (converted once, by rank 0)."""
        root, tag = os.path.split(tag_dir.rstrip("/"))
        marker = read_marker(tag_dir)
        saved_world = marker.get("world_size", self.world_size)
        try:
            if saved_world == self.world_size:
                path, client = engine.load_checkpoint(root, tag=tag)
            else:
                path, client = self._load_universal(engine, tag_dir)
            if path is None:
                raise RuntimeError("DeepSpeed found no checkpoint files")
            client["rng"] = self._rng_of_this_rank(tag_dir, client, saved_world)
        except (RuntimeError, OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"cannot load checkpoint {tag_dir} ({reason}): damaged, or written by another "
                                  "setup; move it away to resume from the previous checkpoint, or use another "
                                  "run.dir=... / run.resume=never") from e
        self.loaded_step = int(marker.get("step", client.get("step", -1)))
        return client

    def _load_universal(self, engine, tag_dir: str) -> Tuple[Optional[str], Dict[str, Any]]:
        """DeepSpeed's universal load (ZeRO state re-partitioned for this world size) of the
        world-size independent copy, made by rank 0 while the others wait."""
        from .distributed import broadcast_object

        failure = None
        if self.rank == 0:
            try:
                convert_to_universal(tag_dir)
            except Exception as e:  # noqa: BLE001 - broadcast and raised everywhere: no rank left waiting
                failure = e
        failure = broadcast_object(failure)
        if isinstance(failure, CheckpointError):
            failure.same_on_every_rank = True  # rank 0 reports it; the others stay quiet
        if failure is not None:
            raise failure
        engine._config.load_universal_checkpoint = True  # for this load only: the config is read per call
        try:
            path, client = engine.load_checkpoint(tag_dir, tag=UNIVERSAL_DIR)
        finally:
            engine._config.load_universal_checkpoint = False
        if path is not None:
            _load_untrained_tensors(engine.module, path)
        return path, client

    def _rng_of_this_rank(self, tag_dir: str, client: Dict[str, Any], saved_world: int) -> Optional[Dict[str, Any]]:
        """This rank's saved RNG states; a rank the checkpoint did not have (more ranks now) gets
        fresh streams seeded from (run seed, step, rank), shaped like rank 0's states."""
        own = os.path.join(tag_dir, rng_file(self.rank))
        if os.path.exists(own):
            return torch.load(own, weights_only=False)
        template = os.path.join(tag_dir, rng_file(0))
        if self.rank < saved_world or not os.path.exists(template):
            return None
        seed = ((client.get("config") or {}).get("run") or {}).get("seed", 0)
        return fresh_rng_state(torch.load(template, weights_only=False), (seed, client.get("step", 0), self.rank))


def convert_to_universal(tag_dir: str) -> str:
    """`tag_dir/universal`: DeepSpeed's world-size independent form of the checkpoint (one
    folder per parameter with its fp32 weights and Adam moments), written by ds_to_universal
    into a temporary folder and renamed, so a finished copy is reused by any later resume."""
    out = os.path.join(tag_dir, UNIVERSAL_DIR)
    if os.path.isdir(out):
        return out
    tmp = f"{out}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted conversion
    workers = str(min(4, os.cpu_count() or 1))
    log.info("converting %s to DeepSpeed's universal checkpoint format (world size changed)", tag_dir)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag_dir,
                        "--output_folder", tmp, "--inject_missing_state", "--num_extract_workers", workers,
                        "--num_merge_workers", workers], capture_output=True, text=True)
    stray = os.path.join(tag_dir, "latest_universal")  # the converter's pointer; tags are named here
    if os.path.exists(stray):
        os.remove(stray)
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()
        raise CheckpointError(f"cannot convert checkpoint {tag_dir} to DeepSpeed's universal format to resume it "
                              f"at another world size ({lines[-1]}); relaunch with the world size it was written "
                              "by (its COMMITTED marker names it), or start from exported weights")
    os.replace(tmp, out)
    log.info("converted in %.1f s: %s", time.time() - t0, out)
    return out


def _load_untrained_tensors(module: torch.nn.Module, model_states: str) -> None:
    """Buffers and frozen parameters from the model-states file: DeepSpeed's universal load
    restores only the optimizer's parameters and skips the module state dict."""
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    saved = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    module.load_state_dict({k: v for k, v in saved.items() if k not in trained}, strict=False)


def fresh_rng_state(template: Dict[str, Any], key: Tuple[int, ...]) -> Dict[str, Any]:
    """RNG states shaped like `template` (rng_state() plus torch.Generator states), all newly
    seeded from `key`. Accelerator states are left out: the trainer's own seeding covers them."""
    seeds = np.random.SeedSequence(list(key)).generate_state(len(template) + 3)
    state = {"python": random.Random(int(seeds[0])).getstate(),
             "numpy": np.random.RandomState(int(seeds[1])).get_state(),
             "torch": torch.Generator().manual_seed(int(seeds[2])).get_state()}
    extra = [k for k in template if k not in ("python", "numpy", "torch", "cuda")]
    for k, seed in zip(extra, seeds[3:]):
        state[k] = torch.Generator().manual_seed(int(seed)).get_state()
    return state


# ----------------------------------------------------------------------------- export
def fp32_state_dict(tag_dir: str) -> Dict[str, torch.Tensor]:
    """Full fp32 weights (+ buffers) of a checkpoint, from the ZeRO-1/2 fp32 master partitions.

    Each rank's optimizer file holds its slice of one flat fp32 vector per parameter group
    (padding only at the end); `param_shapes` in the model file gives the order. Same result as
    DeepSpeed's zero_to_fp32 for fp32 runs, and it also reads bf16 runs (BF16_Optimizer files,
    which zero_to_fp32 rejects), where the module weights themselves are only bf16.
    """
    ms = torch.load(os.path.join(tag_dir, MODEL_STATES_FILE), map_location="cpu", weights_only=False)
    files = glob.glob(os.path.join(tag_dir, OPTIM_STATES_GLOB))
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


def export(run_dir: str, out: str, step: Optional[int] = None, ema: bool = False) -> str:
    """Export a run's checkpoint (find_checkpoint's rule: `step`'s, else the newest intact one);
    returns its folder."""
    where, tag_dir = find_checkpoint(run_dir, step, way_out="export another step with --step N")
    if tag_dir is None:
        raise CheckpointError(f"no committed checkpoint in {where.ckpt_root}")
    export_checkpoint(tag_dir, out, ema)
    return tag_dir


def export_checkpoint(tag_dir: str, out: str, ema: bool = False) -> None:
    """Write the official-format state dict ({"model": fp32 state dict}) of a committed checkpoint:
    its trained weights, or with `ema` its EMA of weights (train.ema_decay). The format follows the
    weights: a SimMIM run (encoder.mask_token) -> the official SimMIM state dict (encoder.*,
    decoder.0.*), else the official classification one."""
    state = ema_state_dict(tag_dir) if ema else fp32_state_dict(tag_dir)
    official_writer(state)(state, out)


def official_writer(state: Dict[str, torch.Tensor]):
    """swinv2's writer of the official format these weights are in (picked from their keys)."""
    from swinv2 import save_official_state_dict, save_simmim_state_dict

    simmim = any(k == "encoder.mask_token" or k.endswith(".encoder.mask_token") for k in state)
    return save_simmim_state_dict if simmim else save_official_state_dict


def ema_state_dict(tag_dir: str) -> Dict[str, torch.Tensor]:
    """The full state dict with the checkpoint's EMA of weights (fp32) in place of its trained
    weights; the entries the EMA does not keep (derived ones such as attn_mask) are the checkpoint's."""
    path = os.path.join(tag_dir, EMA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tag_dir} has no {EMA_FILE}: its run had no EMA of weights (train.ema_decay)")
    return {**fp32_state_dict(tag_dir), **torch.load(path, map_location="cpu", weights_only=False)["weights"]}


def verify(run_dir: str) -> List[Tuple[str, List[Tuple[str, str]]]]:
    """[(tag dir, damage)] of every committed checkpoint of a run (damage [] when intact)."""
    root = locate(run_dir).ckpt_root
    return [(path, damaged_files(path)) for _, path, committed in checkpoint_dirs(root) if committed]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m swinv2_train.checkpoint")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="official-format fp32 weights from a run's checkpoint")
    e.add_argument("run_dir")
    e.add_argument("out")
    e.add_argument("--step", type=int, default=None, help="default: newest committed")
    e.add_argument("--ema", action="store_true", help="the EMA of weights (runs with train.ema_decay)")
    v = sub.add_parser("verify", help="check every committed checkpoint against its marker's sizes and checksums")
    v.add_argument("run_dir")
    a = p.parse_args(argv)
    if a.cmd == "verify":
        results = verify(a.run_dir)
        for path, damage in results:
            print(f"{path}: " + (f"DAMAGED: {_describe(damage)}" if damage else "ok"))
        if not results:
            print(f"no committed checkpoint in {locate(a.run_dir).ckpt_root}")
        return 1 if not results or any(damage for _, damage in results) else 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    try:
        tag_dir = export(a.run_dir, a.out, a.step, ema=a.ema)
    except CheckpointError as e:  # no committed, or a damaged checkpoint: one message, no traceback
        from .cli import exit_code_for, report_user_error
        report_user_error(p.prog, e)
        return exit_code_for(e)
    print(f"exported {tag_dir} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `swinv2-eval` command (see USAGE): a run directory or an official .pth -> its model, config
and validation data -> swinv2_train.evaluation.evaluate, the trainer's own evaluation path."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

import swinv2
from swinv2.class_map import load_class_map
from swinv2.config import SwinV2Config
from swinv2.weights import CheckpointMismatchError, canonical_key, unwrap_checkpoint
from .checkpoint import find_checkpoint, fp32_state_dict, saved_config
from .cli import prepare_overrides  # shard lists and brace patterns, as for swinv2-train
from .config import TrainSchema, model_kwargs  # importing it registers the schema
from .data import shards as S
from .data.config import as_data_config, kept_from_before
from .data.sources import resolve_sources
from .errors import CheckpointError, UsageError, UserError
from .evaluation import DTYPES, evaluate
from .tasks import TASKS
from .rundir import (CHECKPOINTS, EXPORT_FILE, MARKER, VAL_LOSS, VAL_SAMPLES, VAL_TOP1, VAL_TOP5, RunDir, step_of,
                     tag_for)

log = logging.getLogger("swinv2-eval")

CONFIG_MODULE = "swinv2_train.configs"  # the same tree as swinv2-train (pkg://swinv2_train.configs)

USAGE = f"""\
usage: swinv2-eval RUN_DIR_OR_PTH [--json OUT.json] [--step N] [KEY=VALUE ...]

Evaluate trained weights on validation shards: prints top-1, top-5, loss, the number of
samples and images/s. KEY=VALUE are Hydra overrides with the keys of swinv2-train.

RUN_DIR_OR_PTH
  a run directory    the newest intact committed checkpoint ({CHECKPOINTS}/step_*/{MARKER}, fp32
                     master weights) with the run's config.yaml as the base config: no model
                     keys needed. A checkpoint directory (RUN/{CHECKPOINTS}/{tag_for(300)}) works too.
  an official .pth   e.g. RUN_DIR/{EXPORT_FILE} or a released Swin V2 file; the model comes
                     from the model.* keys on top of swinv2-train's default config
                     (model.variant=X selects the variant's sizes unless embed_dim/depths/
                     num_heads are given too).

options
  --json OUT.json    also write the results (and what was evaluated) as JSON
  --step N           a run directory's checkpoint of step N instead of the newest

useful keys
  data.root=DIR / data.val_shards=PATTERN    the validation data (default: the run's; the built-in
                                             synthetic set when no data is configured)
  model.img_size=N model.window_size=M       evaluate at another resolution / window: window-
                                             dependent buffers are rebuilt and the position-bias
                                             MLP is fed coordinates normalised by the checkpoint's
                                             windows (model.pretrained_window_sizes, read from the
                                             checkpoint unless given)
  train.eval_batch_size=N                    batch size (default: the train micro batch)
  train.eval_class_map=map22kto1k.txt        score a 21841-class head on 1000-class labels
  train.precision=fp32|bf16|fp16             evaluation dtype (default: the run's)
  data.num_workers=N                         decoding workers

examples
  swinv2-eval runs/default
  swinv2-eval runs/x data.root=/data/in1k-wds --json runs/x/eval.json
  swinv2-eval runs/x model.img_size=384 model.window_size=24
  swinv2-eval swinv2_base_w16_256.pth model.variant=base model.img_size=256 \\
      model.window_size=16 data.root=/data/in1k-wds
  swinv2-eval swinv2_base_w12_192_22k.pth model.variant=base model.img_size=192 \\
      model.window_size=12 data.root=/data/in1k-wds train.eval_class_map=map22kto1k.txt
"""


# ----------------------------------------------------------------------------- command line
@dataclass
class EvalArgs:
    source: str
    overrides: List[str] = field(default_factory=list)
    json_out: Optional[str] = None
    step: Optional[int] = None


def parse_args(argv: List[str]) -> EvalArgs:
    """RUN_DIR_OR_PTH, --json/--step (anywhere) and Hydra overrides (everything else)."""
    source, rest, json_out, step = None, [], None, None
    it = iter(argv)
    for arg in it:
        flag, eq, value = arg.partition("=")
        if flag in ("--json", "--step"):
            value = value if eq else next(it, None)
            if value is None:
                raise UsageError(f"{flag} needs a value (see swinv2-eval --help)")
            if flag == "--json":
                json_out = value
            elif not value.isdigit():
                raise UsageError(f"--step {value}: expected a step number, e.g. --step 300")
            else:
                step = int(value)
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {arg!r} (see swinv2-eval --help)")
        elif source is None and "=" not in arg:
            source = arg
        else:
            rest.append(arg)
    if source is None:
        raise UsageError("give a run directory or an official-format .pth file first, e.g. "
                        "swinv2-eval runs/default (see swinv2-eval --help)")

    return EvalArgs(source, prepare_overrides(rest), json_out, step)


def override_keys(overrides: List[str]) -> set:
    """Keys (or config groups) the user set: 'model.img_size=64' -> 'model.img_size'."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


# ----------------------------------------------------------------------------- inputs
def checkpoint_of(path: str, step: Optional[int]) -> Tuple[str, str]:
    """(run dir, checkpoint dir) of a run dir, its checkpoint root or a step_N dir, by
    swinv2_train.checkpoint.find_checkpoint's rule (the same as resuming)."""
    where, tag_dir = find_checkpoint(path, step, way_out="choose another with --step N, or evaluate an exported .pth")
    if tag_dir is None:
        raise CheckpointError(f"{path}: no committed checkpoint in {where.ckpt_root} (a run saves one at its end, "
                              "every train.ckpt_every steps and on preemption); evaluate an exported "
                              ".pth instead, or let the run finish")
    return where.run_dir, tag_dir


def _schema_keys_only(saved: Any, schema: Any) -> Any:
    """The saved config without keys the current schema no longer has (runs written by an older
    version stay evaluable); free-form nodes (dicts of Any) are kept whole."""
    if not isinstance(saved, dict) or not isinstance(schema, DictConfig) or \
            OmegaConf.get_type(schema) in (dict, None):
        return saved
    return {k: v if OmegaConf.is_missing(schema, k) else _schema_keys_only(v, schema[k])
            for k, v in saved.items() if k in schema.keys()}


def _task_keys_only(task: Any) -> Any:
    """A saved task node without the keys its task's config no longer has (a classification run
    written before each task had its own config also saved SimMIM's keys)."""
    if not isinstance(task, dict) or task.get("name") not in TASKS:
        return task
    return _schema_keys_only(task, OmegaConf.structured(TASKS[task["name"]].Config))


def load_run_config(run_dir: str, tag_dir: str) -> Dict[str, Any]:
    """The config the checkpoint was written with (its own copy, else the run's config.yaml)."""
    saved = saved_config(tag_dir)
    path = RunDir(run_dir).config
    if saved is None and os.path.isfile(path):
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if saved is None:
        raise UserError(f"{run_dir}: no config.yaml (not a swinv2-train run directory?); evaluate "
                        "its exported .pth with the model.* keys instead")
    saved = _schema_keys_only(saved, OmegaConf.structured(TrainSchema))
    if isinstance(saved.get("data"), dict):  # a run keeps the settings it began with (its pixels)
        saved["data"] = {**saved["data"], **kept_from_before(saved["data"])}
    return {**saved, "task": _task_keys_only(saved.get("task"))} if "task" in saved else saved


def compose_config(overrides: List[str], base: Optional[Dict[str, Any]] = None):
    """swinv2-train's config tree with `overrides`; with `base` (a run's saved config) that
    config replaces the default tree and the overrides apply on top of it."""
    name = "train"
    if base is not None:
        name = "swinv2_eval_run"
        task = (base.get("task") or {}).get("name")  # its task's typed config, as task=NAME gives it
        defaults = ["train_schema", *([{"task": task}] if task in TASKS else []), "_self_"]
        ConfigStore.instance().store(name=name, node={"defaults": defaults, **base})
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name=name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        # Hydra's first line says what failed, OmegaConf's cause (if any) why
        msg = " ".join(str(x).strip().splitlines()[0] for x in (e, e.__cause__) if x and str(x).strip())
        if base is not None and "No match in the defaults list" in str(e):
            msg += (" (a run directory fixes its config: set keys, e.g. data.root=DIR or "
                    "data.val_shards=PATTERN, not config groups)")
        raise UsageError(f"override error: {msg}") from None


def load_weights(path: str) -> Dict[str, torch.Tensor]:
    try:
        return dict(unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True)))
    except Exception as e:  # a text file, a pickle with code, a truncated file, ...
        raise CheckpointError(f"{path}: not a readable official-format state dict ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); give a .pth written by "
                        f"swinv2-train ({EXPORT_FILE}) or an official Swin V2 release") from None


# ----------------------------------------------------------------------------- model
_COORDS_RE = re.compile(r"^layers\.(\d+)\.blocks\.0\.attn\.relative_coords_table$")


def checkpoint_windows(state_dict: Dict[str, torch.Tensor]) -> Dict[int, Tuple[int, int]]:
    """{stage: (window, normalising window)} from the checkpoint's relative_coords_table buffers.

    The table holds offsets normalised by (P-1), P = the window the position-bias MLP was
    trained with (pretrained_window_size, or the block's own window M), scaled to +-8 and
    log-spaced: its largest entry is log2(1 + 8 (M-1)/(P-1)) / 3, which gives P back."""
    out = {}
    for key, table in state_dict.items():
        m = _COORDS_RE.match(canonical_key(key))
        if not m or table.ndim != 4:
            continue
        window = (int(table.shape[1]) + 1) // 2
        if window <= 1:  # a 1x1 window has only offset 0: nothing to normalise
            out[int(m.group(1))] = (window, 0)
            continue
        top = float(table.float().abs().max())
        ratio = (2.0 ** (3.0 * top) - 1.0) / 8.0  # (M-1)/(P-1)
        out[int(m.group(1))] = (window, round(1 + (window - 1) / ratio))
    return out


def checkpoint_architecture(state_dict: Dict[str, torch.Tensor]) -> str:
    """The checkpoint's sizes as model.* keys (for the message of a shape mismatch)."""
    names = {canonical_key(k): v for k, v in state_dict.items()}
    embed = names.get("patch_embed.proj.weight")
    blocks: Dict[int, int] = {}
    heads: Dict[int, int] = {}
    for name, value in names.items():
        m = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.logit_scale$", name)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
            heads[stage] = int(value.shape[0])
    parts = []
    if embed is not None:
        parts.append(f"model.embed_dim={embed.shape[0]}")
    if blocks:
        parts.append("model.depths=[" + ",".join(str(blocks[i]) for i in sorted(blocks)) + "]")
        parts.append("model.num_heads=[" + ",".join(str(heads[i]) for i in sorted(heads)) + "]")
    windows = checkpoint_windows(state_dict)
    if 0 in windows:
        parts.append(f"stage-0 window {windows[0][0]}")
    return " ".join(parts) or "no recognisable Swin V2 keys"


def window_transfer(model_cfg, state_dict, user_keys: set) -> Tuple[Optional[List[int]], Optional[str]]:
    """pretrained_window_sizes that keep the checkpoint's position-bias coordinates (or None to
    keep the configured ones) and a note when the windows change.

    The position-bias MLP was trained on offsets normalised by each stage's training window; at
    another window (another window_size, or an img_size that clips a stage's window to its
    resolution) the official recipe normalises by the old window: pretrained_window_sizes."""
    stages = checkpoint_windows(state_dict)
    new = [model_cfg.stage_window(i).window for i in range(model_cfg.num_stages)]
    if sorted(stages) != list(range(len(new))):
        return None, None  # no buffers (or another depth: the load reports that)
    if "model.pretrained_window_sizes" in user_keys:
        return None, None
    old = [stages[i][0] for i in range(len(new))]
    # 0 where the normalising window is the model's own (the same table either way)
    pws = [norm if norm != window else 0 for (_, norm), window in zip((stages[i] for i in range(len(new))), new)]
    note = None
    if old != new:
        note = (f"window transfer: checkpoint stage windows {old} -> model {new}; position bias "
                f"from coordinates normalised by the checkpoint's windows "
                f"(model.pretrained_window_sizes={pws})")
    return pws, note


def build_model(cfg, state_dict, user_keys: set, source: str) -> Tuple[nn.Module, List[str]]:
    """The model of `cfg.model` (classes: the checkpoint's head), loaded with `state_dict`."""
    head = next((v for k, v in state_dict.items() if canonical_key(k) == "head.weight"), None)
    if head is None:
        raise CheckpointError(f"{source}: the checkpoint has no classification head (head.weight), "
                        "so there is nothing to score; evaluate a classifier checkpoint")
    kw = model_kwargs(cfg.model, int(head.shape[0]))
    try:
        geometry = SwinV2Config.from_variant(**kw)
    except ValueError as e:  # "field: message"
        raise UserError(f"model.{e}") from None
    notes = []
    pws, note = window_transfer(geometry, state_dict, user_keys)
    if pws is not None:
        kw["pretrained_window_sizes"] = tuple(pws)
    if note:
        notes.append(note)
    model = swinv2.create_model(**kw)
    try:
        with warnings.catch_warnings():  # a head that does not fit is part of the error below
            warnings.simplefilter("ignore")
            report = swinv2.load_official_state_dict(model, state_dict)
    except CheckpointMismatchError as e:
        detail = str(e).removeprefix("checkpoint does not match the model: ")
        detail = detail if len(detail) <= 160 else detail[:160] + "..."
        raise CheckpointError(f"{source} does not fit the model (model.variant={cfg.model.variant}, "
                        f"embed_dim={geometry.embed_dim}, depths={list(geometry.depths)}, "
                        f"num_heads={list(geometry.num_heads)}): the checkpoint has "
                        f"{checkpoint_architecture(state_dict)}; set those model.* keys "
                        f"({detail})") from None
    if report.head_action != "loaded":
        raise CheckpointError(f"{source}: the checkpoint's head does not fit the model ({report.messages[-1]})")
    notes += [m for m in report.messages if not m.startswith(("dropped", "window transfer"))]
    return model, notes


# ----------------------------------------------------------------------------- data
def eval_data_config(cfg):
    """The validation source of `cfg.data`, resolved (shards, sample count, classes)."""
    try:
        d = resolve_sources(as_data_config(cfg.data), ("val",))
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"no validation data: {e}; set data.root=DIR or data.val_shards=PATTERN") from None
    if not d.val_shards:
        raise UserError("no validation data: set data.root=DIR (a shard directory) or "
                        "data.val_shards=PATTERN")
    try:
        S.expand_shards(d.val_shards)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"data.val_shards: {e}; set data.root=DIR or data.val_shards=PATTERN") from None
    return d


def eval_class_map(cfg, num_outputs: int, num_classes: Optional[int]) -> Optional[torch.Tensor]:
    """train.eval_class_map as logit columns; checks that the scored classes match the labels."""
    path = cfg.train.eval_class_map
    if path is None:
        if num_classes is not None and num_outputs != num_classes:
            hint = (" (a 22K head on 1K labels: train.eval_class_map=map22kto1k.txt)"
                    if num_outputs == 21841 else "")
            raise UserError(f"the checkpoint's head has {num_outputs} classes, the validation data "
                            f"{num_classes} (data.num_classes){hint}; evaluate on data with the "
                            "checkpoint's classes")
        return None
    try:
        index = torch.tensor(load_class_map(path).source_indices(num_outputs), dtype=torch.int64)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"train.eval_class_map={path}: {e}") from None
    if num_classes is not None and index.numel() != num_classes:
        raise UserError(f"train.eval_class_map={path} selects {index.numel()} classes, the "
                        f"validation data has {num_classes} (data.num_classes)")
    return index


# ----------------------------------------------------------------------------- the command
def run_eval(args: EvalArgs) -> Dict[str, Any]:
    """Resolve the input, config, model and data of `args`; evaluate; return the results."""
    source = os.path.abspath(args.source)
    if not os.path.exists(source):
        raise UserError(f"{args.source}: no such file or directory; give a run directory "
                        "(runs/NAME) or an official-format .pth")
    user_keys = override_keys(args.overrides)
    if os.path.isdir(source):
        run_dir, tag_dir = checkpoint_of(source, args.step)
        cfg = compose_config(args.overrides, base=load_run_config(run_dir, tag_dir))
        state_dict = fp32_state_dict(tag_dir)  # its files were checked against the marker just now
        weights, step = tag_dir, step_of(tag_dir)
    else:
        if args.step is not None:
            raise UsageError(f"--step {args.step}: only for a run directory, {args.source} is a file")
        cfg = compose_config(args.overrides)  # model.variant=X: X's sizes (cli.with_variant_sizes)
        state_dict = load_weights(source)
        weights, step = source, None

    data_cfg = eval_data_config(cfg)
    model, notes = build_model(cfg, state_dict, user_keys, args.source)
    outputs = model.config.num_classes
    class_map = eval_class_map(cfg, outputs, data_cfg.num_classes)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[cfg.train.precision]
    model.to(device=device, dtype=dtype)
    t = cfg.train
    batch_size = t.eval_batch_size or max(1, t.batch_size // t.grad_accum)
    start = time.perf_counter()
    metrics = evaluate(model, data_cfg, img_size=model.config.img_size, batch_size=batch_size,
                       device=device, dtype=dtype,
                       class_map=class_map.to(device) if class_map is not None else None)
    seconds = time.perf_counter() - start
    if metrics[VAL_SAMPLES] == 0:
        raise UserError(f"data.val_shards={data_cfg.val_shards}: no readable samples (an image and "
                        "a .cls label per sample); check the shards")
    return {
        "source": source, "weights": weights, "step": step,
        "top1": metrics[VAL_TOP1], "top5": metrics[VAL_TOP5], "loss": metrics[VAL_LOSS],
        "samples": int(metrics[VAL_SAMPLES]), "seconds": seconds,
        "images_per_s": metrics[VAL_SAMPLES] / max(seconds, 1e-9),
        "model": {"variant": cfg.model.variant, "img_size": model.config.img_size,
                  "window_size": model.config.window_size, "num_classes": outputs,
                  "pretrained_window_sizes": list(model.config.pretrained_window_sizes),
                  "params": sum(p.numel() for p in model.parameters())},
        "val_shards": data_cfg.val_shards, "batch_size": batch_size,
        "precision": cfg.train.precision, "device": str(device),
        "class_map": cfg.train.eval_class_map, "notes": notes,
    }


def format_result(r: Dict[str, Any]) -> str:
    m = r["model"]
    what = r["weights"] + (f" (step {r['step']})" if r["step"] is not None else "")
    lines = [f"== swinv2-eval {what} =="]
    lines += [f"note      {n}" for n in r["notes"]]
    lines += [
        f"model     {m['variant']}, {m['params'] / 1e6:.2f}M params, {m['img_size']} px, window "
        f"{m['window_size']}, {m['num_classes']} classes, {r['precision']} on {r['device']}",
        f"data      {r['val_shards']}" + (f" (class map {r['class_map']})" if r["class_map"] else ""),
        f"top-1     {r['top1']:.2f}%",
        f"top-5     {r['top5']:.2f}%",
        f"loss      {r['loss']:.4f}",
        f"samples   {r['samples']}",
        f"speed     {r['images_per_s']:.1f} images/s ({r['seconds']:.1f} s, batch {r['batch_size']})",
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # DeepSpeed's checkpoint files unpickle DeepSpeed objects: pick its accelerator without probing
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        args = parse_args(argv)
        result = run_eval(args)
    except UserError as e:  # a user error: one clear message, no traceback
        from .cli import exit_code_for, report_user_error
        report_user_error("swinv2-eval", e)
        return exit_code_for(e)
    print(format_result(result), flush=True)
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"results   {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

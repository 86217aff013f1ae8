"""`swinv2-train ... run.plan=true`: the preflight plan of a run, printed before anything is started.

It builds the run's model on the meta device only (no weights, no process group, no data read) and
prints what a user asks before renting GPUs:

* parameters and FLOPs per image (`swinv2.flops` counts multiply-accumulates; a training step is
  3 x 2 x MACs per image, activation recomputation not counted);
* per-GPU memory for `run.plan_ranks` ranks (null: the launcher's world size), the configured ZeRO stage,
  precision, activation checkpointing and attention kernel, DeepSpeed's own buffers included
  (swinv2_train.memory, calibrated by measurement), with a warning when it exceeds the GPU's memory
  (detected, else `train.gpu_memory_gb`, else the memory of `run.plan_gpu`);
* the images/s a node of `run.plan_gpus_per_node` GPUs delivers at `run.plan_mfu`, and the data-loader
  workers that takes at `run.plan_loader_rate` images/s per core.
"""
from __future__ import annotations

import math
import os
from types import SimpleNamespace
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

import swinv2
from . import memory
from .config import _fail, model_config
from .distributed import launch_world_size
from .gpus import GPUS, gpu_entry
from .tasks import TASKS
from .throughput import matmul_precision

GB = memory.GB


def _model(cfg: DictConfig, c: Any, num_classes: int) -> tuple[swinv2.SwinV2Config, int]:
    """The run's model config and its parameter count, the task's model built on the meta device."""
    model_cfg = model_config(c.model, num_classes)  # the architecture only: weights files are not needed
    spec = SimpleNamespace(run=c.run, model=model_cfg, task=c.task, pretrained=None, pretrained_class_map=None)
    with torch.device("meta"):
        model = TASKS[c.task.name].build_model(spec)
    return model_cfg, sum(p.numel() for p in model.parameters())


def _gpu(c: Any) -> tuple[str, Optional[float], Optional[float], str]:
    """(name, dense peak TFLOP/s in the run's matmul precision (throughput.matmul_precision: the MFU's),
    memory GB, where the memory figure comes from)."""
    given = c.train.gpu_memory_gb
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        entry = gpu_entry(props.name) or {}
        mem = given if given else props.total_memory / GB
        peak = entry.get(matmul_precision(c.train.precision))
        return props.name, peak, mem, "train.gpu_memory_gb" if given else "detected"
    entry = gpu_entry(c.run.plan_gpu)
    if entry is None:
        _fail("run.plan_gpu", f"{c.run.plan_gpu!r} is not one of {'|'.join(GPUS)}")
    mem = given if given else entry["memory_gb"]
    peak = entry[matmul_precision(c.train.precision)]
    return c.run.plan_gpu, peak, mem, "train.gpu_memory_gb" if given else "run.plan_gpu"


def make_plan(cfg: DictConfig) -> Dict[str, Any]:
    """The plan's figures (what `format_plan` prints)."""
    c = OmegaConf.to_object(cfg)
    ranks = c.run.validate_plan().plan_ranks or launch_world_size()
    train = c.train.validate(ranks)
    classes = c.data.num_classes or 1000
    model_cfg, params = _model(cfg, c, classes)
    micro = train.batch_size // (ranks * train.grad_accum)
    ac = train.activation_checkpointing
    setup = memory.Setup(model_cfg, micro, train.precision, ranks, ac.every > 0, c.deepspeed.zero_stage,
                         c.deepspeed.reduce_bucket_size, c.deepspeed.overlap_comm)
    mem = memory.per_gpu(setup, params)
    macs = swinv2.flops(model_cfg)
    gpu, peak, gpu_mem, mem_from = _gpu(c)
    peak = getattr(train, "peak_tflops", None) or peak  # train.peak_tflops, where the schema has it
    per_gpu_ips = c.run.plan_mfu * peak * 1e12 / (6 * macs) if peak else None
    node = min(c.run.plan_gpus_per_node, ranks)
    return dict(name=c.run.name, task=c.task.name, variant=c.model.variant, model=model_cfg, classes=classes,
                classes_given=c.data.num_classes is not None, params=params, macs=macs, ranks=ranks,
                global_batch=train.batch_size, accum=train.grad_accum, micro=micro, precision=train.precision,
                zero_stage=c.deepspeed.zero_stage, checkpointing=ac, memory=mem, gpu=gpu, gpu_memory_gb=gpu_mem,
                gpu_memory_from=mem_from, peak_tflops=peak, mfu=c.run.plan_mfu, images_per_s_gpu=per_gpu_ips,
                gpus_per_node=node, loader_rate=c.run.plan_loader_rate,
                fits=mem["total"] <= gpu_mem * GB)


def _gb(b: float) -> str:
    return f"{b / GB:.2f}"


def _memory_lines(p: Dict[str, Any]) -> list[str]:
    m, s = p["memory"], p["memory"]["model_state"]
    ac = p["checkpointing"]
    ckpt = f"every {ac.every} block(s), {ac.policy}" if ac.every else "off"
    if ac.every > 1 or ac.policy != "block":
        ckpt += " (modelled as every block, block policy)"
    model = p["model"]
    kernel = model.attention + (f" (chunk {model.sequential_chunk})" if model.attention == "sequential" else "")
    lines = [f"memory/GPU  {p['precision']}, ZeRO-{p['zero_stage']}, {p['ranks']} ranks, micro batch {p['micro']}, "
             f"checkpointing {ckpt}, attention {kernel}",
             f"            params {_gb(s['params'])} + grads {_gb(s['grads'])} + optimizer {_gb(s['optimizer'])} "
             f"+ activations {_gb(m['activations'])} + CUDA reserve {_gb(m['reserve'])} = "
             f"{_gb(m['without_deepspeed'])} GB"]
    for name, b in m["deepspeed"].items():
        lines.append(f"            + DeepSpeed's {name} {_gb(b)} GB")
    lines.append(f"            = {_gb(m['total'])} GB per GPU")
    return lines


def format_plan(p: Dict[str, Any]) -> str:
    model = p["model"]
    pad = ", pad_to_window" if model.pad_to_window else ""
    cls = f"{p['classes']} classes" + ("" if p["classes_given"] else " (data.num_classes null: 1000 assumed)")
    lines = [f"plan of {p['name']} (task {p['task']}): nothing was built at full size, no process group started",
             f"model       {p['variant']} {model.img_size}^2/W{model.window_size}{pad}, {cls}: "
             f"{p['params'] / 1e6:,.1f}M parameters, {p['macs'] / 1e9:,.2f} GMACs per image forward "
             f"({6 * p['macs'] / 1e12:,.3f} TFLOP per image trained)",
             f"batch       global {p['global_batch']} = {p['ranks']} ranks x {p['accum']} accumulation x micro "
             f"{p['micro']}", *_memory_lines(p)]
    verdict = "fits" if p["fits"] else "DOES NOT FIT"
    lines.append(f"GPU         {p['gpu']}: {p['gpu_memory_gb']:.0f} GB ({p['gpu_memory_from']}): {verdict}")
    if not p["fits"]:
        lines.append(f"WARNING: the estimate {_gb(p['memory']['total'])} GB per GPU exceeds the GPU's "
                     f"{p['gpu_memory_gb']:.0f} GB: use more ranks (ZeRO shards the optimizer state), activation "
                     "checkpointing, the sequential kernel or a smaller micro batch (train.grad_accum)")
    lines += _throughput_lines(p)
    return "\n".join(lines)


def _throughput_lines(p: Dict[str, Any]) -> list[str]:
    if not p["images_per_s_gpu"]:
        return [f"throughput  no {p['precision']} peak known for {p['gpu']}: give train.peak_tflops"]
    gpu_ips = p["images_per_s_gpu"]
    node_ips = gpu_ips * p["gpus_per_node"]
    return [f"throughput  at {100 * p['mfu']:.0f}% MFU of {p['peak_tflops']:.0f} TFLOP/s ({p['precision']}): "
            f"{gpu_ips:,.1f} images/s per GPU, {node_ips:,.0f} per node of {p['gpus_per_node']} GPUs",
            f"data        at {p['loader_rate']:g} images/s per loader core: {math.ceil(node_ips / p['loader_rate'])} "
            f"data workers per node ({math.ceil(gpu_ips / p['loader_rate'])} per GPU)"]


def print_plan(cfg: DictConfig) -> Dict[str, Any]:
    """`run.plan=true`: print the plan (rank 0 of a launch only) and return its figures."""
    p = make_plan(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_plan(p), flush=True)
    return p

"""Everything systems-side that is applied to the plain model from outside (torchtitan style):
activation checkpointing, fused kernels, optimizer, DeepSpeed config and `deepspeed.initialize`.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, Tuple

import torch

import swinv2
from .spec import RunSpec

log = logging.getLogger(__name__)


def build_ds_config(spec: RunSpec) -> Dict[str, Any]:
    """The DeepSpeed JSON of the spec (batch geometry, precision, optim.clip_grad, deepspeed.*)."""
    t, ds, b = spec.train, spec.deepspeed, spec.batch
    conf: Dict[str, Any] = {
        "train_batch_size": b.global_batch,
        "train_micro_batch_size_per_gpu": b.micro,
        "gradient_accumulation_steps": b.accum,
        "gradient_clipping": float(spec.optim.clip_grad or 0.0),
        "zero_optimization": {
            "stage": ds.zero_stage,
            # overlap_comm defaults to on only for stage 3: set it explicitly
            "overlap_comm": ds.overlap_comm,
            # contiguous_gradients=false (+ reduce_scatter=false) skipped the all-reduce on CPU
            # in some DeepSpeed releases (PR #8381): keep it on
            "contiguous_gradients": ds.contiguous_gradients,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "allgather_bucket_size": ds.allgather_bucket_size,
        },
        "steps_per_print": 10**12,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if t.precision == "bf16":
        # fp32 gradient accumulation routes ZeRO-1 to BF16_Optimizer; overflow steps are
        # detected (and we log was_step_applied) instead of being applied silently
        conf["bf16"] = {"enabled": True, "check_grad_overflow": True}
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
    elif t.precision == "fp16":
        conf["fp16"] = {"enabled": True, "loss_scale": ds.loss_scale,
                        "initial_scale_power": ds.initial_scale_power,
                        "loss_scale_window": ds.loss_scale_window, "hysteresis": ds.hysteresis,
                        "min_loss_scale": ds.min_loss_scale}
    if t.precision != "fp32":
        # DeepSpeed casts only parameters by default; the CPB coordinate table and the shift mask
        # are float buffers that meet bf16/fp16 weights inside the model, so cast them too
        conf.setdefault("data_types", {})["buffer_dtype"] = t.precision
    return _merge(conf, dict(ds.extra))


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apex_available() -> bool:
    try:
        import apex  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _use_apex(fused: str) -> bool:
    if fused == "torch":
        return False
    if fused == "apex" and not _apex_available():
        raise RuntimeError("optim.fused=apex but apex is not importable (or no CUDA device)")
    return _apex_available()


def swap_fused_layernorm(model: torch.nn.Module) -> int:
    """Replace nn.LayerNorm by apex FusedLayerNorm (same parameters, same state-dict keys)."""
    from apex.normalization import FusedLayerNorm

    n = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.LayerNorm and child.elementwise_affine:
                fused = FusedLayerNorm(child.normalized_shape, eps=child.eps)
                fused.weight, fused.bias = child.weight, child.bias
                setattr(parent, name, fused)
                n += 1
    return n


def build_optimizer(spec: RunSpec, model: torch.nn.Module, use_apex: bool,
                    backbone_prefix: str = "") -> torch.optim.Optimizer:
    """AdamW over swinv2.param_groups: the official weight-decay exclusions and, with optim.layer_decay
    < 1, one decay/no_decay pair per layer id. `backbone_prefix`: where the backbone's parameter
    names start (the task's; SimMIM: "encoder.", its mask_token -> id 0, decoder -> L+1)."""
    groups = swinv2.param_groups(model, spec.optim.weight_decay, spec.optim.layer_decay,
                                 backbone_prefix=backbone_prefix)
    log.info("optimizer groups: %s", describe_layer_decay(groups, spec.optim.layer_decay))
    kw = dict(lr=spec.schedule.lr, betas=tuple(spec.optim.betas), eps=spec.optim.eps)
    if use_apex:
        from apex.optimizers import FusedAdam
        return FusedAdam(groups, adam_w_mode=True, **kw)
    return torch.optim.AdamW(groups, **kw)


def describe_layer_decay(groups: list, layer_decay: float) -> str:
    """One compact line: "off", or "layer_decay 0.87: id:scale(n params) ..." per layer id."""
    if layer_decay == 1.0:
        return f"{len(groups)} (weight decay / none), layer_decay off"
    per_id: Dict[int, list] = {}
    for g in groups:
        entry = per_id.setdefault(g["layer_id"], [g["lr_scale"], 0])
        entry[1] += len(g["params"])
    items = " ".join(f"{i}:{scale:.4g}({n})" for i, (scale, n) in sorted(per_id.items()))
    return f"{len(groups)}, layer_decay {layer_decay:g}, layer id:lr_scale(tensors) {items}"


# torch.compile against eager on CPUs, measured (scripts/bench_compile.py: tiny 256^2/W8 batch 8, fp32,
# fwd+bwd, eager and compiled interleaved; docs/PERFORMANCE.md section 4): CPU model -> figure.
COMPILE_ON_CPU = {
    "AMD EPYC": "compiled 1.04x eager (median of paired repeats in 3 runs, middle half 1.00-1.05x; 2026-12-07): pays",
    "Intel(R) Xeon(R) Processor": "compiled 0.98-1.03x eager (one process per run, 2026-12-02): within noise",
}


def compile_note(device: torch.device) -> str | None:
    """One line for train.compile=true on a CPU where compile was not measured to pay (None on GPUs)."""
    if device.type != "cpu":
        return None
    from swinv2_tools.bench_meta import cpu_model

    cpu = cpu_model()
    figure = next((f for name, f in COMPILE_ON_CPU.items() if cpu.startswith(name)), None)
    if figure is None:
        return (f"train.compile=true on a CPU not measured ({cpu}): on the CPUs measured a compiled step took "
                "0.98-1.04x eager's time after 1-2 minutes of compiling (docs/PERFORMANCE.md section 4); "
                "python scripts/bench_compile.py measures this one")
    if figure.endswith(": pays"):
        return None
    return f"train.compile=true on this CPU ({cpu}) does not pay: {figure} (docs/PERFORMANCE.md section 4)"


def parallelize(spec: RunSpec, model: torch.nn.Module, backbone_prefix: str = "") -> Tuple[Any, Dict[str, Any]]:
    """Checkpointing -> fused kernels -> DeepSpeed engine (ZeRO-1) -> optional compile.
    `backbone_prefix`: the task's (build_optimizer).

    Returns (engine, info) where info records what was chosen, for the run log.
    """
    import deepspeed  # deferred: DS_ACCELERATOR must be set first (init_distributed), and it costs seconds

    info: Dict[str, Any] = {}
    ac = spec.train.activation_checkpointing
    info["checkpointed_blocks"] = (swinv2.apply_activation_checkpointing(
        model, every=ac.every, stages=list(ac.stages) if ac.stages is not None else None, granularity=ac.policy)
        if ac.every > 0 else 0)
    use_apex = _use_apex(spec.optim.fused)
    info["fused_layernorm"] = swap_fused_layernorm(model) if use_apex else 0
    optimizer = build_optimizer(spec, model, use_apex, backbone_prefix)
    info["optimizer"] = ("apex FusedAdam (adam_w_mode) + FusedLayerNorm" if use_apex else
                         "torch.optim.AdamW (native; apex " + ("disabled by optim.fused=torch)" if _apex_available()
                                                                else "not importable)"))
    info["attention"] = spec.model.attention
    ds_config = build_ds_config(spec)
    info["ds_config"] = ds_config
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if spec.train.compile:
        # in place (state-dict keys stay official), with static shapes: dynamo's automatic dynamic
        # shapes are remembered across processes (its profile cache), so after an eval at another batch
        # size a resumed run would compile shape-generic kernels, round differently and lose exact resume
        engine.compile(compile_kwargs={"dynamic": False})
        note = compile_note(next(model.parameters()).device)
        if note:
            log.warning(note)
    info["compiled"] = bool(spec.train.compile)
    log.info("parallelize: optimizer=%s, checkpointed blocks=%d, fused LayerNorms=%d, attention=%s, "
             "compile=%s, ZeRO stage %d, precision=%s", info["optimizer"], info["checkpointed_blocks"],
             info["fused_layernorm"], info["attention"], info["compiled"], spec.deepspeed.zero_stage,
             spec.train.precision)
    return engine, info

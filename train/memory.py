"""Per-GPU training memory of a SwinV2 under DeepSpeed ZeRO data parallelism, calibrated by measurement
(the memory model; `swinv2-train ... run.plan=true` and scripts/memory_model.py use it).

    per-GPU memory = parameters + gradients + optimizer state / N + activations + DeepSpeed's buffers

* Parameters are counted on the meta device (SwinV2-G's 3B are never allocated).
* Bytes per parameter, N data-parallel ranks, ZeRO stage 1 (optimizer state partitioned; stage 2 also
  partitions the gradients):
    fp32:  params 4 + grads 4 (replicated)               + Adam m, v 8 / N
    bf16:  params 2 + grads 2 (bf16, replicated)         + fp32 master 4 + Adam m, v 8 = 12 / N
  DeepSpeed's own buffers (`deepspeed_buffers`): ZeRO-1 with bf16 and the fp32 gradient accumulation
  the trainer configures selects DeepSpeed's ``BF16_Optimizer``, which keeps a FULL-size fp32
  gradient-accumulation buffer on every rank (4 bytes per parameter, replicated; deepspeed/runtime/
  bf16_optimizer.py ``fp32_groups_gradients_flat``); ``data_types.grad_accum_dtype=bf16`` avoids it.
  In fp32 the ZeRO optimizer keeps an fp32 copy of its partition (4 / N); ZeRO-2 reduces through
  ``reduce_bucket_size``-element buckets (two with ``overlap_comm``).
* Activations are MEASURED: one forward+backward of a small calibration model on CPU under a
  TorchDispatchMode that tracks every live tensor storage (for bf16 the model and input are cast to
  bf16, as DeepSpeed's bf16 mode runs them; torch autocast would instead also cache a bf16 copy of
  every weight for the step, about 2 bytes/parameter more),
  plus ``saved_tensors_hooks`` that attribute each tensor saved for backward to its block and split
  it into a part proportional to tokens x channels (``alpha``, bytes per token per channel) and a
  part proportional to tokens x heads x window area (``beta``, the (B*nW, nH, N, N) attention
  matrices; zero for the ``sequential`` kernel, which saves only q, k, v). The prediction scales
  these per block by the target's token count, width, heads and window:
      held (no checkpointing) = sum_b alpha*T_b*C_b + beta*T_b*nH_b*N_b            (+ stem/merges)
      held (checkpointing)    = sum_b T_b*C_b*bytes(residual)                      (+ stem/merges)
      peak = max over blocks b (backward order) of
             saved(blocks <= b) + gamma * working_set(b) [+ sequential chunk scores of b]
  where ``gamma`` (the backward's transient: recomputed block, activation gradients) is fitted
  on the calibration run. The fitted coefficients of every kernel and precision are kept in
  memory_coefficients.py beside this file (`python scripts/memory_model.py --write-coefficients`
  measures them again), so a plan needs no measurement.
* Not modelled: CUDA context and cuDNN/cuBLAS workspaces (a flat reserve, 1 GB by default),
  allocator fragmentation.
"""
from __future__ import annotations

import functools
import math
import pprint
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

GB = 1e9
COEFFICIENTS_FILE = Path(__file__).with_name("memory_coefficients.py")  # written by write_coefficients
RESERVE_GB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces


# ---------------------------------------------------------------------------------------------
# bytes per parameter (the arithmetic the tests check)
# ---------------------------------------------------------------------------------------------
def state_bytes(num_params: int, precision: str, ranks: int, ds_fp32_grad_acc: bool = False,
                zero_stage: int = 1) -> dict[str, float]:
    """Parameter, gradient and optimizer-state bytes per GPU under ZeRO-1 (ZeRO-2: gradients / N too)
    with AdamW. fp16 has bf16's sizes. `ds_fp32_grad_acc`: DeepSpeed's BF16_Optimizer buffer (see
    `deepspeed_buffers`)."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    P = num_params
    grad_share = 1.0 / ranks if zero_stage >= 2 else 1.0
    if precision == "fp32":
        out = dict(params=4.0 * P, grads=4.0 * P * grad_share, optimizer=8.0 * P / ranks)
    elif precision == "bf16":
        out = dict(params=2.0 * P, grads=2.0 * P * grad_share, optimizer=12.0 * P / ranks)
    else:
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    out["ds_fp32_grad_acc"] = 4.0 * P if (ds_fp32_grad_acc and precision == "bf16") else 0.0
    return out


def deepspeed_buffers(num_params: int, precision: str, ranks: int, zero_stage: int = 1,
                      reduce_bucket_size: int = 500_000_000, overlap_comm: bool = True) -> dict[str, float]:
    """Bytes per GPU that DeepSpeed (0.19) allocates beyond `state_bytes`, as the trainer configures it
    (bf16 with fp32 gradient accumulation; parallelize.build_ds_config), by name."""
    P = num_params
    out: dict[str, float] = {}
    if precision == "bf16" and zero_stage == 1:  # BF16_Optimizer: full-size fp32 gradient accumulation
        out["fp32 gradient buffer"] = 4.0 * P
    if precision == "fp32":  # the ZeRO optimizer's fp32 copy of its partition of the weights
        out["fp32 weight partition"] = 4.0 * P / ranks
    if zero_stage >= 2:  # fp32 gradient partition + the reduce buckets
        if precision == "bf16":
            out["fp32 gradient partition"] = 4.0 * P / ranks
        elem = 2 if precision == "bf16" else 4
        out["reduce buckets"] = min(reduce_bucket_size, P) * elem * (2 if overlap_comm else 1)
    return out


def count_params(variant: str, **overrides: Any) -> int:
    """Parameter count built on the meta device (no memory); independent of image and window size."""
    import swinv2

    with torch.device("meta"):
        model = swinv2.create_model(variant, img_size=256, window_size=8, **overrides)
    return sum(p.numel() for p in model.parameters())


@dataclass
class Measurement:
    img: int
    window: int
    batch: int
    attention: str
    ckpt: bool
    precision: str
    peak_act: int  # peak live bytes during forward+backward, parameter gradients excluded
    held_after_forward: int  # live bytes when the forward (incl. loss) returned
    largest: int
    blocks: list[dict[str, Any]]  # per block: tokens, dim, heads, N, lin, att, const bytes saved
    other: dict[str, int]  # saved bytes outside blocks by region (stem, merge{i}, head)
    residual_bytes: int  # element size of the block inputs (the residual stream)


def _block_geometry(model) -> list[dict[str, Any]]:
    import swinv2

    geo = []
    for ref in swinv2.iter_blocks(model):
        blk = ref.block
        H, W = blk.input_resolution
        geo.append(dict(index=ref.index, name=ref.name, stage=ref.stage, res=H, dim=blk.dim,
                        heads=blk.num_heads, window=blk.window_size, N=blk.window_size**2))
    return geo


def measure(variant: str, img: int, window: int, batch: int = 1, attention: str = "reference",
            ckpt: bool = False, precision: str = "fp32", chunk: int | None = None,
            overrides: dict[str, Any] | None = None, seed: int = 0) -> Measurement:
    """One training forward+backward on CPU; live-tensor peak and per-block saved-tensor breakdown."""
    import swinv2

    torch.manual_seed(seed)
    kw = dict(overrides or {})
    if chunk is not None:
        kw["sequential_chunk"] = chunk
    model = swinv2.create_model(variant, img_size=img, window_size=window, attention=attention, **kw).train()
    if ckpt:
        swinv2.apply_activation_checkpointing(model, every=1)
    geo = _block_geometry(model)
    x = torch.randn(batch, 3, img, img)
    if precision == "bf16":
        # DeepSpeed's bf16 mode: parameters AND activations in bf16 (no autocast, so no cached
        # bf16 weight copies; the fp32 master lives in the optimizer, counted in state_bytes).
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    y = torch.randint(0, model.config.num_classes or 1, (batch,))
    existing = [p for p in model.parameters()] + [b for b in model.buffers()] + [x, y]

    # attribute saved tensors to the module region that saved them
    region: list[Any] = ["stem"]
    hooks = []

    def enter(tag):  # hook factories: hooks must return None (a value would replace args/outputs)
        return lambda *_: (region.append(tag), None)[1]

    def leave(*_):
        region.pop()
    for g in geo:
        blk = model.get_submodule(g["name"])
        hooks.append(blk.register_forward_pre_hook(enter(("block", g["index"]))))
        hooks.append(blk.register_forward_hook(leave))
    residual_size = {}

    def _res_hook(m, a):
        residual_size.setdefault("bytes", a[0].element_size())  # returns None: args unchanged
    hooks.append(model.get_submodule(geo[0]["name"]).register_forward_pre_hook(_res_hook))
    for i, layer in enumerate(model.layers):
        if layer.downsample is not None:
            hooks.append(layer.downsample.register_forward_pre_hook(enter(("merge", i))))
            hooks.append(layer.downsample.register_forward_hook(leave))
    hooks.append(model.norm.register_forward_pre_hook(enter(("head", 0))))
    skip = {t.untyped_storage().data_ptr() for t in existing if t.device.type != "meta"}
    saved: dict[int, tuple[Any, int, tuple[int, ...]]] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip and ptr not in saved:
                saved[ptr] = (region[-1], t.untyped_storage().nbytes(), tuple(t.shape))
        return t

    from swinv2_tools.live_memory import LiveMemoryTracker  # measurement only: a plan never imports it

    tracker = LiveMemoryTracker().ignore_existing(existing)
    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        held = tracker.live_bytes()
        loss.backward()
    for h in hooks:
        h.remove()
    grad_ptrs = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    peak = tracker.peak_excluding(grad_ptrs)

    blocks = [dict(g, tokens=batch * g["res"] ** 2, lin=0, att=0, const=0) for g in geo]
    other: dict[str, int] = {}
    for reg, nb, shape in saved.values():
        if isinstance(reg, tuple) and reg[0] == "block":
            b = blocks[reg[1]]
            N = b["N"]
            n_win_rows = b["tokens"] // N  # B * nW
            if len(shape) >= 2 and shape[-2:] == (N, N) and N > 1:
                if math.prod(shape) >= n_win_rows * b["heads"] * N * N:  # (B*nW, nH, N, N); bias/mask are smaller
                    b["att"] += nb
                else:
                    b["const"] += nb
            elif len(shape) >= 2 and shape[-2] in ((2 * b["window"] - 1) ** 2,) or \
                    (len(shape) >= 3 and shape[-3:-1] == (2 * b["window"] - 1, 2 * b["window"] - 1)):
                b["const"] += nb  # CPB MLP on the (2M-1)^2 coordinate table
            else:
                b["lin"] += nb
        else:
            key = reg if isinstance(reg, str) else f"{reg[0]}{reg[1]}"
            other[key] = other.get(key, 0) + nb
    return Measurement(img, window, batch, attention, ckpt, precision, peak, held, tracker.largest, blocks, other,
                       residual_size.get("bytes", 4))


# ---------------------------------------------------------------------------------------------
# the activation model
# ---------------------------------------------------------------------------------------------
@dataclass
class Coefficients:
    attention: str
    precision: str
    alpha: float  # saved bytes per token per channel in a block (not attention matrices)
    beta: float  # saved bytes per token per head per window token (attention matrices)
    const_per_table: float  # saved bytes per CPB table row per block ((2M-1)^2 rows)
    other_per_tc: dict[str, float]  # outside blocks, bytes per token per channel of the region's stage
    residual_bytes: int
    gamma: dict[bool, float]  # transient / max block working set, for ckpt False / True
    # fp32 (nH, N, N) score buffers per window of a chunk alive at once in the sequential kernel's
    # backward: measured 2 per window (+1 constant) by tests/test_sequential_memory.py
    seq_chunk_factor: float = 2.0
    calibration: str = ""


def _stage_geometry(cfg, img: int, window: int, batch: int) -> list[dict[str, Any]]:
    """Per block geometry for a target; a window that does not divide a stage pads it (detection style)."""
    from swinv2.config import window_geometry

    out = []
    pr = img // cfg.patch_size
    for i, depth in enumerate(cfg.depths):
        res = pr // 2**i
        win = window_geometry(res, window).window  # the model's clipping rule; padding is ours
        pad_res = math.ceil(res / win) * win
        for j in range(depth):
            out.append(dict(stage=i, res=res, dim=cfg.embed_dim * 2**i, heads=cfg.num_heads[i], window=win,
                            N=win * win, tokens=batch * res * res, att_tokens=batch * pad_res * pad_res))
    return out


def _block_work(b: dict[str, Any], co: Coefficients) -> float:
    table_rows = (2 * b["window"] - 1) ** 2
    att = 0.0 if co.attention == "sequential" else co.beta * b["att_tokens"] * b["heads"] * b["N"]
    return co.alpha * b["tokens"] * b["dim"] + att + co.const_per_table * table_rows


def _seq_chunk_bytes(b: dict[str, Any], co: Coefficients, chunk: int) -> float:
    if co.attention != "sequential":
        return 0.0
    windows = b["att_tokens"] // b["N"]
    return co.seq_chunk_factor * min(chunk, windows) * b["heads"] * b["N"] ** 2 * 4


def _other_bytes(cfg, img: int, batch: int, co: Coefficients) -> float:
    pr = img // cfg.patch_size
    total = 0.0
    for key, per in co.other_per_tc.items():
        if key == "stem":
            i = 0
        elif key.startswith("merge"):
            i = int(key[5:])
        else:  # head: final norm over the last stage
            i = len(cfg.depths) - 1
        total += per * batch * (pr // 2**i) ** 2 * cfg.embed_dim * 2**i
    return total


def predict_activations(cfg, img: int, window: int, batch: int, ckpt: bool, co: Coefficients,
                        chunk: int = 32) -> dict[str, float]:
    """Activation bytes: what the forward leaves saved (held) and the backward peak.

    The backward visits blocks last to first; while it works on block b, the saved tensors of
    blocks before b (b included) are still alive, plus b's transient (gamma x its working set:
    activation gradients and, with checkpointing, its recomputed activations; plus the sequential
    kernel's chunk scores). The peak is the max over b.
    """
    blocks = _stage_geometry(cfg, img, window, batch)
    work = [_block_work(b, co) for b in blocks]
    other = _other_bytes(cfg, img, batch, co)
    saved = [b["tokens"] * b["dim"] * co.residual_bytes for b in blocks] if ckpt else work
    held = sum(saved) + other
    peak, cum = 0.0, other
    for b, w, sv in zip(blocks, work, saved):
        cum += sv
        peak = max(peak, cum + co.gamma[ckpt] * w + _seq_chunk_bytes(b, co, chunk))
    return dict(held=held, transient=peak - held, peak=max(peak, held))


def calibrate(attention: str, precision: str = "fp32", img: int = 128, window: int = 8, batch: int = 2,
              chunk: int = 32) -> Coefficients:
    """Fit alpha/beta/gamma on SwinV2-T-shaped blocks at a small input (no checkpointing + checkpointing)."""
    import swinv2

    m = measure("tiny", img, window, batch, attention, False, precision, chunk)
    tc = sum(b["tokens"] * b["dim"] for b in m.blocks)
    thn = sum(b["tokens"] * b["heads"] * b["N"] for b in m.blocks)
    rows = sum((2 * b["window"] - 1) ** 2 for b in m.blocks)
    cfg = swinv2.SwinV2Config.from_variant("tiny", img_size=img, window_size=window)
    pr = img // cfg.patch_size
    other_per_tc = {}
    for key, nb in m.other.items():
        i = 0 if key == "stem" else (int(key[5:]) if key.startswith("merge") else len(cfg.depths) - 1)
        other_per_tc[key] = nb / (batch * (pr // 2**i) ** 2 * cfg.embed_dim * 2**i)
    co = Coefficients(attention, precision, alpha=sum(b["lin"] for b in m.blocks) / tc,
                      beta=sum(b["att"] for b in m.blocks) / thn if thn else 0.0,
                      const_per_table=sum(b["const"] for b in m.blocks) / rows, other_per_tc=other_per_tc,
                      residual_bytes=m.residual_bytes, gamma={False: 0.0, True: 0.0},
                      calibration=f"tiny {img}^2/W{window} batch {batch}, {precision}, CPU")
    for ck, meas in ((False, m), (True, measure("tiny", img, window, batch, attention, True, precision, chunk))):
        lo, hi = 0.0, 64.0  # the predicted peak is increasing in gamma: bisect to the measured peak
        for _ in range(60):
            co.gamma[ck] = (lo + hi) / 2
            if predict_activations(cfg, img, window, batch, ck, co, chunk)["peak"] > meas.peak_act:
                hi = co.gamma[ck]
            else:
                lo = co.gamma[ck]
        co.gamma[ck] = lo
    return co




# ---------------------------------------------------------------------------------------------
# the stored calibration
# ---------------------------------------------------------------------------------------------
def coefficients_to_json(co: Coefficients) -> dict[str, Any]:
    return co.__dict__ | {"gamma": {str(k): v for k, v in co.gamma.items()}}


def write_coefficients(coeffs: list[Coefficients], meta: dict[str, Any], path: Path = COEFFICIENTS_FILE) -> None:
    """Keep a calibration as a Python module (shipped in the package like any module)."""
    data = {"meta": meta, "coefficients": {f"{c.attention} {c.precision}": coefficients_to_json(c) for c in coeffs}}
    path.write_text('"""The memory model\'s calibration (swinv2_train.memory), written by '
                    '`python scripts/memory_model.py --write-coefficients`."""\n'
                    f"CALIBRATION = {pprint.pformat(data, width=110, sort_dicts=False)}\n")


@functools.lru_cache(maxsize=None)
def stored_coefficients(attention: str, precision: str) -> Coefficients:
    """The calibration kept in memory_coefficients.py (fp16 has bf16's sizes)."""
    from .memory_coefficients import CALIBRATION

    precision = "bf16" if precision == "fp16" else precision
    data = CALIBRATION["coefficients"][f"{attention} {precision}"]
    return Coefficients(**(data | {"gamma": {k == "True": v for k, v in data["gamma"].items()}}))


@dataclass
class Setup:
    """What decides the memory of one rank (the plan's and the table's input)."""
    config: Any  # swinv2.SwinV2Config of the model (its own img_size, window, kernel, chunk)
    micro_batch: int
    precision: str  # fp32 | bf16 | fp16
    ranks: int
    checkpointing: bool
    zero_stage: int = 1
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    reserve_gb: float = RESERVE_GB


def per_gpu(setup: Setup, num_params: int, co: Optional[Coefficients] = None) -> dict[str, Any]:
    """Per-GPU bytes of one rank, part by part: `model_state` (params, grads, optimizer), `activations`,
    `reserve`, `deepspeed` (its buffers by name), `total` (everything) and `without_deepspeed`."""
    c = setup.config
    prec = "bf16" if setup.precision == "fp16" else setup.precision
    co = co or stored_coefficients(c.attention, prec)
    state = state_bytes(num_params, prec, setup.ranks, zero_stage=setup.zero_stage)
    state.pop("ds_fp32_grad_acc")
    act = predict_activations(c, c.img_size, c.window_size, setup.micro_batch, setup.checkpointing, co,
                              c.sequential_chunk)["peak"]
    ds = deepspeed_buffers(num_params, prec, setup.ranks, setup.zero_stage, setup.reduce_bucket_size,
                           setup.overlap_comm)
    base = sum(state.values()) + act + setup.reserve_gb * GB
    return dict(model_state=state, activations=act, reserve=setup.reserve_gb * GB, deepspeed=ds,
                without_deepspeed=base, total=base + sum(ds.values()))

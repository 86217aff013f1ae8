#!/usr/bin/env python
"""Per-GPU training-memory model for SwinV2 (ZeRO-1 data parallel), calibrated by measurement.

    per-GPU memory = parameters + gradients + optimizer state / N + activations

* Parameters are counted on the meta device (SwinV2-G's 3B are never allocated).
* Bytes per parameter, N data-parallel ranks, ZeRO stage 1 (optimizer state partitioned):
    fp32:  params 4 + grads 4 (replicated)               + Adam m, v 8 / N
    bf16:  params 2 + grads 2 (bf16, replicated)         + fp32 master 4 + Adam m, v 8 = 12 / N
  DeepSpeed's ``BF16_Optimizer`` (what ZeRO-1 + bf16 selects with the default fp32 gradient
  accumulation) also keeps a FULL-size fp32 gradient-accumulation buffer on every rank (4 bytes per
  parameter, replicated; see deepspeed/runtime/bf16_optimizer.py ``fp32_groups_gradients_flat``).
  It is reported as a separate column ("+DS fp32 grad acc"); ``data_types.grad_accum_dtype=bf16``
  avoids it.
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
  on the calibration run. ``--validate`` checks the activation prediction against measurements at
  two other resolutions.
* Not modelled: CUDA context and cuDNN/cuBLAS workspaces (``--reserve-gb``, default 1.0 is added
  to the totals), allocator fragmentation, DeepSpeed communication buckets.

Examples::

    python scripts/memory_model.py --validate                     # predicted vs measured on CPU
    python scripts/memory_model.py --giant-table                  # SwinV2-G 1536^2, N = 1, 8, 16, 64
    python scripts/memory_model.py --variant large --img 384 --window 24 --batch 8 --ranks 8
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from swinv2_tools.bench_meta import bench_metadata
from swinv2_tools.live_memory import LiveMemoryTracker  # (tests use the tracker too)

GB = 1e9


# ---------------------------------------------------------------------------------------------
# bytes per parameter (the arithmetic the tests check)
# ---------------------------------------------------------------------------------------------
def state_bytes(num_params: int, precision: str, ranks: int, ds_fp32_grad_acc: bool = False) -> dict[str, float]:
    """Parameter, gradient and optimizer-state bytes per GPU under ZeRO-1 with AdamW."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    P = num_params
    if precision == "fp32":
        out = dict(params=4.0 * P, grads=4.0 * P, optimizer=8.0 * P / ranks)
    elif precision == "bf16":
        out = dict(params=2.0 * P, grads=2.0 * P, optimizer=12.0 * P / ranks)
    else:
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    out["ds_fp32_grad_acc"] = 4.0 * P if (ds_fp32_grad_acc and precision == "bf16") else 0.0
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
# CLI
# ---------------------------------------------------------------------------------------------
def _fmt_gb(b: float) -> str:
    return f"{b / GB:.2f}"


def validate(attentions: Iterable[str], precision: str, points: list[tuple[int, int]], chunk: int) -> list[dict]:
    import swinv2

    rows = []
    for att in attentions:
        co = calibrate(att, precision, chunk=chunk)
        for ck in (False, True):
            for img, win in points:
                cfg = swinv2.SwinV2Config.from_variant("tiny", img_size=img, window_size=win)
                pred = predict_activations(cfg, img, win, 1, ck, co, chunk)
                meas = measure("tiny", img, win, 1, att, ck, precision, chunk)
                rows.append(dict(attention=att, ckpt=ck, img=img, window=win, precision=precision,
                                 predicted_gb=pred["peak"] / GB, measured_gb=meas.peak_act / GB,
                                 error=pred["peak"] / meas.peak_act - 1))
                r = rows[-1]
                print(f"| tiny {img}^2/W{win} b1 | {att} | {'y' if ck else 'n'} | {r['predicted_gb']:.3f} | "
                      f"{r['measured_gb']:.3f} | {100 * r['error']:+.1f}% |", flush=True)
    return rows


def table(variant: str, img: int, windows: list[int], batch: int, precision: str, ranks: list[int],
          setups: list[tuple[str, bool]], chunk: int, reserve_gb: float, coeffs: dict[str, Coefficients],
          overrides: dict[str, Any] | None = None) -> list[dict]:
    import swinv2

    P = count_params(variant, **(overrides or {}))
    base = swinv2.SwinV2Config.from_variant(variant, **(overrides or {}))
    print(f"\n{variant}: {P / 1e9:.3f}B parameters (meta device); {img}^2, batch {batch}/GPU, {precision}, "
          f"AdamW, ZeRO-1; sequential_chunk {chunk}; +{reserve_gb} GB CUDA context/workspace reserve\n")
    print("| window | attention | ckpt | N | params | grads | optim/N | activations | total | "
          "fits 40/80 GB | +DS fp32 grad acc | fits 40/80 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for win in windows:
        for att, ck in setups:
            act = predict_activations(base, img, win, batch, ck, coeffs[att], chunk)["peak"]
            for n in ranks:
                s = state_bytes(P, precision, n, ds_fp32_grad_acc=True)
                total = s["params"] + s["grads"] + s["optimizer"] + act + reserve_gb * GB
                total_ds = total + s["ds_fp32_grad_acc"]
                fit = lambda t: f"{'yes' if t <= 40 * GB else 'no'}/{'yes' if t <= 80 * GB else 'no'}"  # noqa: E731
                rows.append(dict(variant=variant, img=img, window=win, attention=att, ckpt=ck, ranks=n,
                                 params_gb=s["params"] / GB, grads_gb=s["grads"] / GB, optim_gb=s["optimizer"] / GB,
                                 act_gb=act / GB, total_gb=total / GB, total_ds_gb=total_ds / GB,
                                 fits40=total <= 40 * GB, fits80=total <= 80 * GB))
                print(f"| W{win} | {att} | {'y' if ck else 'n'} | {n} | {_fmt_gb(s['params'])} | {_fmt_gb(s['grads'])} | "
                      f"{_fmt_gb(s['optimizer'])} | {_fmt_gb(act)} | {_fmt_gb(total)} | {fit(total)} | "
                      f"{_fmt_gb(total_ds)} | {fit(total_ds)} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="giant")
    ap.add_argument("--img", type=int, default=1536)
    ap.add_argument("--window", default="32,24", help="comma list")
    ap.add_argument("--batch", type=int, default=1, help="images per GPU")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--ranks", default="1,8,16,64", help="data-parallel ranks N (comma list)")
    ap.add_argument("--setups", default="sequential:ckpt,reference:ckpt,sequential:nockpt,reference:nockpt",
                    help="attention:ckpt|nockpt comma list")
    ap.add_argument("--chunk", type=int, default=8,
                    help="sequential_chunk (windows per chunk) for the table; G's stage 1 at W32 has 16 heads x "
                    "1024^2 scores per window (64 MB fp32), so the config default 32 would cost ~4 GB of chunk buffers")
    ap.add_argument("--reserve-gb", type=float, default=1.0)
    ap.add_argument("--validate", action="store_true", help="predicted vs measured activations on CPU")
    ap.add_argument("--validate-points", default="256:8,512:16", help="img:window list for --validate")
    ap.add_argument("--giant-table", action="store_true", help="the SwinV2-G 1536^2 table (the defaults)")
    ap.add_argument("--out", default=None, help="write JSON here")
    args = ap.parse_args(argv)

    setups = []
    for s in args.setups.split(","):
        att, ck = s.split(":")
        setups.append((att, ck == "ckpt"))
    result: dict[str, Any] = {"meta": bench_metadata(__file__, argv)}
    if args.validate:
        pts = [tuple(int(v) for v in p.split(":")) for p in args.validate_points.split(",")]
        print(f"\nactivation peak, predicted (calibrated at tiny 128^2/W8 b2) vs measured, CPU {args.precision}\n")
        print("| input | attention | ckpt | predicted GB | measured GB | error |\n|---|---|---|---|---|---|")
        result["validation"] = validate(sorted({a for a, _ in setups}), args.precision, pts, 32)
    coeffs = {a: calibrate(a, args.precision, chunk=32) for a in sorted({a for a, _ in setups})}
    result["coefficients"] = {a: c.__dict__ | {"gamma": {str(k): v for k, v in c.gamma.items()}}
                              for a, c in coeffs.items()}
    result["table"] = table(args.variant, args.img, [int(w) for w in args.window.split(",")], args.batch,
                            args.precision, [int(n) for n in args.ranks.split(",")], setups, args.chunk,
                            args.reserve_gb, coeffs)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The memory model's tables and checks (the model itself is swinv2_train.memory, which
`swinv2-train ... run.plan=true` uses): per-GPU memory of a SwinV2 under ZeRO-1,

    per-GPU memory = parameters + gradients + optimizer state / N + activations (+ DeepSpeed's buffers)

with the activations measured on the CPU and scaled to the target geometry (swinv2_train.memory's
docstring has the model). ``--validate`` checks the activation prediction against measurements at
two other resolutions; ``--write-coefficients`` measures the calibration of every kernel and
precision again and keeps it in the package (swinv2_train/memory_coefficients.py), which the
plan reads.

Examples::

    python scripts/memory_model.py --validate                     # predicted vs measured on CPU
    python scripts/memory_model.py --giant-table                  # SwinV2-G 1536^2, N = 1, 8, 16, 64
    python scripts/memory_model.py --variant large --img 384 --window 24 --batch 8 --ranks 8
    python scripts/memory_model.py --write-coefficients           # re-measure the plan's calibration
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable

from swinv2_tools.bench_meta import bench_metadata
from swinv2_train.memory import (GB, Coefficients, Measurement, _block_geometry, _stage_geometry,  # noqa: F401
                                 calibrate, coefficients_to_json, count_params, deepspeed_buffers, measure,
                                 predict_activations, state_bytes, stored_coefficients, write_coefficients)

KERNELS = ("reference", "fused", "sequential")


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
    ap.add_argument("--calibrate", action="store_true",
                    help="measure the coefficients now (default: the package's stored calibration, as the plan)")
    ap.add_argument("--write-coefficients", action="store_true",
                    help="measure every kernel x fp32/bf16 and keep it as the plan's calibration (about a minute)")
    ap.add_argument("--out", default=None, help="write JSON here")
    args = ap.parse_args(argv)
    if args.write_coefficients:
        write_coefficients([calibrate(k, p) for k in KERNELS for p in ("fp32", "bf16")], bench_metadata(__file__, argv))
        print("wrote swinv2_train/memory_coefficients.py")
        return 0

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
    kernels = sorted({a for a, _ in setups})
    coeffs = {a: calibrate(a, args.precision, chunk=32) if args.calibrate else stored_coefficients(a, args.precision)
              for a in kernels}
    result["coefficients"] = {a: coefficients_to_json(c) for a, c in coeffs.items()}
    result["table"] = table(args.variant, args.img, [int(w) for w in args.window.split(",")], args.batch,
                            args.precision, [int(n) for n in args.ranks.split(",")], setups, args.chunk,
                            args.reserve_gb, coeffs)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""torch.compile and bf16 against fp32 eager: one fwd+bwd of the same model, same input, one process.

For every kernel, four variants of one model (same weights): fp32 eager, fp32 compiled, bf16 eager and
bf16 compiled. bf16 is the trainer's ``train.precision=bf16`` path: weights, buffers and input in bf16
(DeepSpeed casts the module), no autocast. The variants are timed in turn within each repeat
(interleaved), so a change of machine load hits all of them alike; the ratios are the result. For each
precision the compiled/eager ratio is taken per repeat (eager time over compiled time of the same round)
and reported as its median and spread (the middle half and the full range of the repeats), with a
verdict: compile **pays** on this machine when the lower quartile of the pairs is faster compiled,
**costs** when the upper quartile is slower, and is **within noise** otherwise (docs/PERFORMANCE.md,
section 4, has the figure per CPU; train.compile=true on a CPU logs it, train/parallelize.py). Also
printed: the compile time (first compiled step), whether any step after the first recompiled, and the
matrix-product floor of the machine: the step's matrix-product FLOPs (counted on the meta device with
torch's FlopCounterMode, plus the QK^T recompute of the chunked kernels' backward) over this machine's
measured 4096^3 matmul rate in that precision. And, from torch's profiler over one more step, the time
the step spends in matrix-product kernels: how far the products themselves are from that floor, and the
most any fusion of the other work (compile) could gain, step / products. The process runs under the
trainer's CPU allocator policy (``--cpu-malloc``, default auto, as ``train.cpu_malloc``): below 1024^2
freed memory stays in glibc's heap (no page faults).

    python scripts/bench_compile.py                                  # tiny 256^2/W8 batch 8
    python scripts/bench_compile.py --kernels reference --precisions fp32 --repeats 7   # does compile pay here?
    python scripts/bench_compile.py --img 1536 --window 24 --batch 1 --kernels fused --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import swinv2
from swinv2_tools.bench_checkpointing import add_cpu_malloc_option
from swinv2_tools.bench_meta import bench_metadata, summary_line
from swinv2_train.allocator import apply_cpu_malloc_policy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
FLASH_OP = "aten::_scaled_dot_product_flash_attention_for_cpu"  # products with their softmax, inseparable


def build(args, kernel: str, dtype: torch.dtype, device=None) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        m = swinv2.create_model(args.variant, img_size=args.img, window_size=args.window, attention=kernel,
                                drop_path_rate=0.0)
    return m.to(dtype).train()


def step(model, x) -> None:
    model.zero_grad(set_to_none=True)
    model(x).float().logsumexp(-1).mean().backward()


def product_seconds(model, x) -> tuple[float, float]:
    """Seconds of one profiled fwd+bwd spent in matrix-product kernels, and in CPU flash attention.

    Self time, so addmm's copy of the bias into its output counts as other work, as it is."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(model, x)
    self_s = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    return sum(self_s.get(op, 0.0) for op in PRODUCT_OPS), self_s.get(FLASH_OP, 0.0)


def matmul_rate(dtype: torch.dtype, n: int = 4096) -> float:
    """Best FLOP/s of three n^3 matrix products in `dtype` (after one warm-up)."""
    a, b = (torch.randn(n, n).to(dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def product_flops(args, kernel: str) -> float:
    """Matrix-product FLOPs of one fwd+bwd (meta device: shapes only), with the chunked kernels'
    backward recompute of q k^T (it does not keep the probabilities)."""
    model = build(args, "reference", torch.float32, device="meta")
    x = torch.empty(args.batch, 3, args.img, args.img, device="meta")
    with FlopCounterMode(display=False) as fc:
        model(x).logsumexp(-1).mean().backward()
    recompute = 0
    if kernel != "reference":
        for ref in swinv2.iter_blocks(model):  # q k^T: 2 N hd FLOPs per token and head, N = ws^2 (padded)
            blk = ref.block
            H, W = blk.input_resolution
            recompute += 2 * args.batch * (H + blk.pad) * (W + blk.pad) * blk.window_size**2 * blk.dim
    return fc.get_total_flops() + recompute


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="tiny")
    ap.add_argument("--img", type=int, default=256)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kernels", default="reference,fused", help="comma-separated (the default kernel is reference)")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (after one warm-up round)")
    add_cpu_malloc_option(ap)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    malloc = apply_cpu_malloc_policy(args.cpu_malloc, args.img)
    precisions = args.precisions.split(",")
    meta = bench_metadata(__file__, argv, cpu_malloc=malloc,
                          **{k: getattr(args, k) for k in ("variant", "img", "window", "batch")})
    meta["matmul_gflops"] = {p: matmul_rate(DTYPES[p]) / 1e9 for p in precisions}
    x32 = torch.randn(args.batch, 3, args.img, args.img, generator=torch.Generator().manual_seed(1))
    rows, pairs = {}, {}
    for kernel in dict.fromkeys(args.kernels.split(",")):
        flops = product_flops(args, kernel)
        variants, compile_s, inputs = {}, {}, {}
        for p in precisions:
            inputs[p] = x32.to(DTYPES[p])
            variants[f"{p} eager"] = build(args, kernel, DTYPES[p])
            compiled = torch.compile(build(args, kernel, DTYPES[p]), dynamic=False)  # as the trainer
            t = time.perf_counter()
            step(compiled, inputs[p])  # graph capture and compilation
            compile_s[p] = time.perf_counter() - t
            variants[f"{p} compiled"] = compiled
        graphs = counters["stats"]["unique_graphs"]
        times = {name: [] for name in variants}
        for _ in range(args.repeats + 1):  # the first round is a warm-up
            for name, model in variants.items():
                t = time.perf_counter()
                step(model, inputs[name.split()[0]])
                times[name].append(time.perf_counter() - t)
        recompiled = counters["stats"]["unique_graphs"] != graphs
        pairs[kernel] = {p: [e / c for e, c in zip(times[f"{p} eager"][1:], times[f"{p} compiled"][1:])]
                         for p in precisions}
        products = {name: product_seconds(model, inputs[name.split()[0]]) for name, model in variants.items()}
        base = statistics.median(times["fp32 eager"][1:]) if "fp32 eager" in times else None
        for name, ts in times.items():
            med = statistics.median(ts[1:])
            p = name.split()[0]
            floor = flops / (meta["matmul_gflops"][p] * 1e9)
            rows[f"{kernel} {name}"] = dict(
                median_s=med, min_s=min(ts[1:]), max_s=max(ts[1:]), speedup_vs_fp32_eager=base / med if base else None,
                floor_s=floor, time_over_floor=med / floor, compile_s=compile_s[p] if "compiled" in name else None,
                recompiled_after_first_step=recompiled if "compiled" in name else None, gflop=flops / 1e9,
                products_s=products[name][0], flash_attention_s=products[name][1],
                products_over_floor=products[name][0] / floor, time_over_products=med / products[name][0])
    meta["loadavg_after"] = list(os.getloadavg())
    print(f"{summary_line(meta)} -> {meta['loadavg_after'][0]:.2f}")
    print(f"CPU allocator: {malloc}")
    print(f"{args.variant} {args.img}^2/W{args.window} batch {args.batch} fwd+bwd, median of {args.repeats}; "
          "matmul " + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in meta["matmul_gflops"].items()))
    print_table(rows)
    verdicts = {f"{kernel} {p}": compile_verdict(pairs[kernel][p]) for kernel in pairs for p in pairs[kernel]}
    for name, v in verdicts.items():
        print(f"{name}: {verdict_line(v)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "compile_vs_eager": verdicts}, indent=1))
    return 0


def compile_verdict(ratios: list[float]) -> dict:
    """Eager time / compiled time per interleaved repeat -> median, spread and whether compile pays:
    judged on the middle half of the pairs (quartiles), so one round disturbed by other work does
    not decide it; the full range is reported beside."""
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    verdict = "pays" if q1 > 1.0 else "costs" if q3 < 1.0 else "within noise"
    return dict(median=statistics.median(ratios), q1=q1, q3=q3, min=min(ratios), max=max(ratios),
                repeats=len(ratios), ratios=ratios, verdict=verdict)


def verdict_line(v: dict) -> str:
    return (f"compiled {v['median']:.2f}x eager (median of {v['repeats']} paired repeats; middle half "
            f"{v['q1']:.2f}-{v['q3']:.2f}x, all {v['min']:.2f}-{v['max']:.2f}x): {v['verdict']}")


def print_table(rows: dict) -> None:
    print("| kernel, variant | fwd+bwd s (median) | min-max s | vs fp32 eager | product floor s | time / floor | products s "
          "| products / floor | time / products | compile s | recompiled |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        c = f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "-"
        rc = {None: "-", True: "**yes**", False: "no"}[r["recompiled_after_first_step"]]
        sp = f"{r['speedup_vs_fp32_eager']:.2f}x" if r["speedup_vs_fp32_eager"] else "-"
        print(f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | {sp} | {r['floor_s']:.3f} | {r['time_over_floor']:.2f}x "
              f"| {r['products_s']:.3f} | {r['products_over_floor']:.2f}x | {r['time_over_products']:.2f}x | {c} | {rc} |")
    flash = {name: r["flash_attention_s"] for name, r in rows.items() if r["flash_attention_s"]}
    if flash:  # the fused kernel's unmasked blocks: products and softmax in one kernel, counted as other work
        print("CPU flash attention (not in products s): " + ", ".join(f"{n} {s:.3f} s" for n, s in flash.items()))


if __name__ == "__main__":
    sys.exit(main())

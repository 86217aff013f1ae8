#!/usr/bin/env python
"""Activation-checkpointing policies side by side: time and peak live memory of one fwd+bwd.

One process, one model per policy (same weights, same input), the policies timed in turn within
each repeat (interleaved), so a change of machine load hits all of them alike; the ratios to
``none`` are the result, the seconds are this machine's. Peak memory is the largest sum of live
tensor bytes during the step (``LiveMemoryTracker``, a separate untimed pass): deterministic and
independent of the allocator (for RSS, see ``bench.py --configs mid_fused_ckpt_selective,...``).

    python scripts/bench_checkpointing.py                       # tiny 1536^2/W24 batch 1, fused
    python scripts/bench_checkpointing.py --img 768 --repeats 3 --json out.json
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

import swinv2
from swinv2_tools.bench_meta import bench_metadata, summary_line
from swinv2_tools.live_memory import LiveMemoryTracker
from swinv2_train.allocator import CPU_MALLOC_POLICIES, apply_cpu_malloc_policy

POLICIES = ("none", "block", "half", "selective")


def build(policy: str, args) -> torch.nn.Module:
    torch.manual_seed(0)
    m = swinv2.create_model(args.variant, img_size=args.img, window_size=args.window, attention=args.kernel)
    if policy != "none":
        swinv2.apply_activation_checkpointing(m, granularity=policy)
    return m.train()


def step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).float().logsumexp(-1).mean().backward()


def peak_live_gb(model: torch.nn.Module, x: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    with LiveMemoryTracker().ignore_existing([*model.parameters(), *model.buffers(), x]) as tr:
        step(model, x)
    return tr.peak / 1e9


def add_cpu_malloc_option(ap: argparse.ArgumentParser) -> None:
    """--cpu-malloc: the trainer's train.cpu_malloc policy, so a benchmark runs as training would."""
    ap.add_argument("--cpu-malloc", default="auto", choices=CPU_MALLOC_POLICIES,
                    help="the trainer's train.cpu_malloc policy, applied here too (default auto, as the trainer)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="tiny")
    ap.add_argument("--img", type=int, default=1536)
    ap.add_argument("--window", type=int, default=24)
    ap.add_argument("--kernel", default="fused", choices=sorted(swinv2.kernels.KERNELS))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--repeats", type=int, default=2)
    add_cpu_malloc_option(ap)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    malloc = apply_cpu_malloc_policy(args.cpu_malloc, args.img)
    policies = args.policies.split(",")
    x = torch.randn(1, 3, args.img, args.img, generator=torch.Generator().manual_seed(1))
    meta = bench_metadata(__file__, argv, cpu_malloc=malloc,
                          **{k: getattr(args, k) for k in ("variant", "img", "window", "kernel")})
    models = {p: build(p, args) for p in policies}
    peaks = {p: peak_live_gb(models[p], x) for p in policies}  # also the warm-up step
    times: dict[str, list[float]] = {p: [] for p in policies}
    for _ in range(args.repeats):
        for p in policies:  # interleaved: load changes hit every policy
            t = time.perf_counter()
            step(models[p], x)
            times[p].append(time.perf_counter() - t)
    meta["loadavg_after"] = list(os.getloadavg())
    rows = {p: dict(min_s=min(ts), median_s=statistics.median(ts), peak_live_gb=peaks[p]) for p, ts in times.items()}
    ref = rows.get("none")
    print(f"{summary_line(meta)} -> {meta['loadavg_after'][0]:.2f}")
    print(f"{args.variant} {args.img}^2/W{args.window} batch 1 fwd+bwd, kernel {args.kernel}, {args.repeats} repeats; "
          f"allocator: {malloc}")
    print("| policy | fwd+bwd s (min) | median s | time / none | peak live GB | memory / none |")
    print("|---|---|---|---|---|---|")
    for p, r in rows.items():
        tr = f"{r['min_s'] / ref['min_s']:.2f}x" if ref else "-"
        mr = f"{r['peak_live_gb'] / ref['peak_live_gb']:.2f}x" if ref else "-"
        print(f"| {p} | {r['min_s']:.2f} | {r['median_s']:.2f} | {tr} | {r['peak_live_gb']:.2f} | {mr} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "times": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

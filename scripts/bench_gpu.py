#!/usr/bin/env python
"""CUDA training benchmark: bf16 throughput, MFU and the giant 1536^2 memory check.

Needs a CUDA GPU; on a machine without one it exits with status 2 and says so (nothing is faked).

What it measures (bf16 autocast, fp32 master weights, AdamW on the GPU, channels as in the model):

1. ``peak``: the achievable bf16 matmul rate of THIS GPU, measured with a loop of large
   ``torch.matmul`` calls, printed beside the datasheet's dense bf16 peak (swinv2_train.gpus). MFU
   divides by the datasheet peak (as the trainer's MFU does); where the card is not in the table, by
   the measured rate. Both ratios are in the JSON.
2. ``throughput``: for SwinV2-B 256/W8, SwinV2-B 256/W16 and SwinV2-L 192/W12, the largest batch
   that fits (doubling from ``--start-batch`` until CUDA OOM), then images/s of full train steps
   (forward + backward + AdamW) at that batch, with and without ``torch.compile``.
   MFU = 3 x model FLOPs x images/s / peak, where model FLOPs = 2 x the multiply-accumulates that
   ``swinv2.flops`` counts (the official formula counts MACs), and 3 = forward + backward.
3. ``giant``: peak ``torch.cuda.max_memory_allocated`` of one SwinV2-G 1536^2 batch-1 training step
   (activation checkpointing on every block + the ``sequential`` attention kernel, AdamW state on
   the same GPU, no ZeRO). W24 by default: the classification model rejects W32 at 1536 because the
   last stage is 48x48 (the paper's W32 is a detection setting with padding).
4. The same throughput rows for HF transformers' ``Swinv2ForImageClassification`` as the peer (the
   same geometry, random weights, as scripts/bench.py builds it), when transformers is importable.
   (timm's SwinV2 is not used: the project never imports timm.)

It runs from a bare checkout too (a GPU node where nothing was pip-installed: it needs torch, and
transformers for the peer): see ``use_checkout_where_not_installed``. Examples::

    python scripts/bench_gpu.py --out bench_gpu.json                  # all parts, OOM search: 15-30 min
    python scripts/bench_gpu.py --configs base256_w8 --batch 128 --steps 5 --out bench_gpu.json  # < 10 min
    python scripts/bench_gpu.py --parts peak,throughput --configs base256_w8 --no-compile
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

# setup.py's ROOTS for the packages this file imports: installed name -> folder of the checkout
CHECKOUT_PACKAGES = {"swinv2": "swinv2", "swinv2_tools": "scripts", "swinv2_train": "train"}


def use_checkout_where_not_installed() -> None:
    """The one import rule of this file: it imports the project by its installed names (``swinv2``,
    ``swinv2_tools.bench``, ``swinv2_tools.bench_meta``), always. On a GPU node where the project is not
    installed (``python scripts/bench_gpu.py`` from a bare checkout, torch only), each of those packages
    that is not importable is first loaded from the checkout this file is in, under its installed name,
    as setup.py installs it (swinv2/ as ``swinv2``, scripts/ as ``swinv2_tools``). ``sys.path`` is not
    touched, so nothing else of the checkout becomes importable."""
    checkout = Path(__file__).resolve().parents[1]
    for name, folder in CHECKOUT_PACKAGES.items():
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        init = checkout / folder / "__init__.py"
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise


use_checkout_where_not_installed()

import swinv2  # noqa: E402
from swinv2_tools import bench  # noqa: E402
from swinv2_tools.bench_meta import NOT_IMPORTABLE, bench_metadata, summary_line  # noqa: E402
from swinv2_train.gpus import gpu_entry, gpu_key  # noqa: E402  (standard library only)

THROUGHPUT = {
    "base256_w8": dict(variant="base", img=256, window=8),
    "base256_w16": dict(variant="base", img=256, window=16),
    "large192_w12": dict(variant="large", img=192, window=12),
}
NO_CUDA_MESSAGE = ("bench_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
                   "(torch {ver}). Nothing was measured. Run it on a GPU node, e.g. "
                   "`python scripts/bench_gpu.py --out bench_gpu.json`; for CPU numbers use scripts/bench.py.")


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE.format(ver=torch.__version__), file=sys.stderr)
        sys.exit(2)


def torch_device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def measure_matmul_peak(n: int = 8192, iters: int = 50) -> float:
    """Best observed bf16 matmul FLOP/s over a few timed loops of n x n @ n x n."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    del a, b
    torch.cuda.empty_cache()
    return best


def _free() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def _train_step_fn(model, compile_: bool) -> Callable:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compile_ else model

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(fwd(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _try_batch(step, img: int, batch: int, steps: int) -> float | None:
    """Seconds per step at `batch` (median of `steps` after 2 warm-ups), or None on OOM."""
    import torch

    try:
        x = torch.randn(batch, 3, img, img, device="cuda")
        y = torch.randint(0, 1000, (batch,), device="cuda")
        for _ in range(2):
            step(x, y)
        torch.cuda.synchronize()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step(x, y)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        x = y = None  # noqa: F841
        _free()


def build(impl: str, cfg: dict[str, Any], attention: str, device: str = "cuda"):
    """Ours ("ours") or the HF peer ("hf"), as scripts/bench.py builds them, on `device`; a module
    whose forward returns the logits, so compile and the train step treat both alike."""
    import torch

    model, forward = bench.build_model(dict(cfg, model=impl, attention=attention))

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return forward(x)

    return (model if impl == "ours" else Logits()).to(device)


def _batch_to_time(step, img: int, args) -> tuple[int | None, float | None]:
    """(batch, a first step time or None): --batch as given, else the largest that fits, doubling
    from --start-batch until CUDA OOM (None when even that does not fit)."""
    if args.batch:
        return args.batch, None
    best_b, best_t, b = None, None, args.start_batch
    while b <= args.max_batch:
        t = _try_batch(step, img, b, steps=2)
        if t is None:
            break
        best_b, best_t = b, t
        b *= 2
    return best_b, best_t


def throughput_row(name: str, impl: str, compile_: bool, args, peak: float) -> dict[str, Any]:
    cfg = THROUGHPUT[name]
    row: dict[str, Any] = dict(part="throughput", config=name, impl=impl, compile=compile_,
                               attention=None if impl == "hf" else args.attention, **cfg)
    try:
        model = build(impl, cfg, args.attention)
    except Exception as e:  # transformers missing or model not buildable: recorded, not fatal
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    model.train()
    step = _train_step_fn(model, compile_)
    batch, first_t = _batch_to_time(step, cfg["img"], args)
    t = (_try_batch(step, cfg["img"], batch, steps=args.steps) or first_t) if batch else None
    if t is None:
        row["error"] = f"CUDA OOM at batch {batch or args.start_batch}"
    else:
        fl = 2 * swinv2.flops(swinv2.SwinV2Config.from_variant(cfg["variant"], img_size=cfg["img"],
                                                               window_size=cfg["window"]))
        ips = batch / t
        row.update(batch=batch, step_s=t, images_per_s=ips, model_flops_per_image_fwd=fl,
                   achieved_tflops=3 * fl * ips / 1e12, mfu=3 * fl * ips / (args.table_peak or peak),
                   of_measured_peak=3 * fl * ips / peak)
    del model, step
    _free()
    return row


def giant_row(args) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    row: dict[str, Any] = dict(part="giant", variant="giant", img=1536, window=args.giant_window, batch=1,
                               attention="sequential", checkpointing=True, optimizer="AdamW (same GPU)")
    _free()
    torch.cuda.reset_peak_memory_stats()
    try:
        with torch.device("cuda"):  # built on the GPU: no 12 GB host copy of 3 B parameters, no CPU init
            model = swinv2.create_model("giant", img_size=1536, window_size=args.giant_window, num_classes=1000,
                                        attention="sequential").train()
        swinv2.apply_activation_checkpointing(model, every=1)
        row["params"] = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
        x = torch.randn(1, 3, 1536, 1536, device="cuda")
        y = torch.randint(0, 1000, (1,), device="cuda")
        for i in range(2):  # the second step has AdamW's state allocated: that is the steady-state peak
            torch.cuda.synchronize(); t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            row[f"step{i}_s"] = time.perf_counter() - t0
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        row["reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"CUDA OOM: {str(e).splitlines()[0]}"
        row["peak_gb_before_oom"] = torch.cuda.max_memory_allocated() / 1e9
    except Exception as e:  # recorded, not fatal, like a throughput row's: the rows before it are kept
        row["error"] = f"{type(e).__name__}: {e}"
    finally:
        model = opt = x = y = loss = None  # noqa: F841
        _free()
    return row


def record(res: dict[str, Any], row: dict[str, Any], out: str | None) -> None:
    """Print a finished row and rewrite the results file with it: a run cut off by a time limit (a lent
    GPU's command limit, a SLURM time limit) leaves every row it measured in the file."""
    print(json.dumps(row), flush=True)
    res["rows"].append(row)
    save(res, out)


def save(res: dict[str, Any], out: str | None) -> None:
    if out:
        tmp = Path(out + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(out)  # never a half-written file


def format_table(res: dict[str, Any]) -> str:
    lines = [f"GPU {res['meta'].get('gpu')}; {peak_line(res)}", "",
             "| config | impl | compile | batch | img/s | TFLOP/s | MFU | of measured peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["part"] != "throughput":
            continue
        if "error" in r:
            lines.append(f"| {r['config']} | {r['impl']} | {r['compile']} | - | ERROR: {r['error'][:60]} | | | |")
        else:
            lines.append(f"| {r['config']} | {r['impl']} | {r['compile']} | {r['batch']} | {r['images_per_s']:.1f} "
                         f"| {r['achieved_tflops']:.1f} | {100 * r['mfu']:.1f}% | {100 * r['of_measured_peak']:.1f}% |")
    for r in res["rows"]:
        if r["part"] == "giant":
            lines.append("")
            what = f"SwinV2-G 1536^2/W{r['window']} b1, ckpt + sequential, AdamW on GPU"
            lines.append(f"{what}: " + (f"peak {r['peak_gb']:.1f} GB allocated ({r['reserved_gb']:.1f} GB reserved), "
                                        f"step {r.get('step1_s', 0):.1f} s" if "error" not in r else r["error"]))
    return "\n".join(lines)


def peak_line(res: dict[str, Any]) -> str:
    """The datasheet's dense bf16 peak beside the measured matmul rate (MFU's denominator: the first)."""
    measured = f"measured bf16 matmul peak {res.get('peak_tflops', 0):.1f} TFLOP/s (8192^3)"
    if not res.get("table_peak_tflops"):
        return f"{measured}; not in the GPU table (swinv2_train.gpus): MFU against the measured peak"
    return (f"table peak {res['table_peak_tflops']:.0f} TFLOP/s ({res['gpu_table']}, dense bf16), {measured} = "
            f"{100 * res.get('peak_tflops', 0) / res['table_peak_tflops']:.0f}% of the table; MFU against the table")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="peak,throughput,giant", help="comma list of peak,throughput,giant")
    ap.add_argument("--configs", default=",".join(THROUGHPUT), help=f"throughput configs: {', '.join(THROUGHPUT)}")
    ap.add_argument("--attention", default="fused", help="our kernel for the throughput rows")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--no-peer", action="store_true", help="skip the HF transformers peer rows")
    ap.add_argument("--start-batch", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None, help="this batch only, no search for the largest")
    ap.add_argument("--max-batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10, help="timed steps at the chosen batch")
    ap.add_argument("--giant-window", type=int, default=24)
    ap.add_argument("--out", default=None, help="results JSON, rewritten after every finished row")
    args = ap.parse_args(argv)
    require_cuda()

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    peer = "throughput" in parts and not args.no_peer
    res: dict[str, Any] = {"meta": bench_metadata(__file__, argv, packages=["transformers"] if peer else []),
                           "rows": []}
    print(summary_line(res["meta"]), flush=True)
    peak = measure_matmul_peak() if (parts & {"peak", "throughput"}) else float("nan")
    entry = gpu_entry(torch_device_name())
    res.update(peak_tflops=peak / 1e12, gpu_table=gpu_key(torch_device_name()),
               table_peak_tflops=entry["bf16"] if entry else None)
    args.table_peak = entry["bf16"] * 1e12 if entry else None
    print(peak_line(res), flush=True)
    if "throughput" in parts:
        impls = ["ours"] + (["hf"] if peer and not res["meta"]["transformers"].startswith(NOT_IMPORTABLE) else [])
        for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
            for impl in impls:
                for comp in ([False] if args.no_compile else [False, True]):
                    record(res, throughput_row(name, impl, comp, args, peak), args.out)
    if "giant" in parts:
        record(res, giant_row(args), args.out)
    print(format_table(res))
    if args.out:  # also a run without rows (--parts peak)
        save(res, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

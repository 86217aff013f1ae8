#!/usr/bin/env python
"""Side-by-side speed and peak-memory benchmark: this project's SwinV2 vs HF transformers' Swinv2.

Every configuration runs in its own CHILD process (same machine, same inputs, same thread count),
so peak memory is that child's alone:

* CPU: peak resident set size of the child (``os.wait4`` rusage ``ru_maxrss``, cross-checked with
  the child's own ``VmHWM``); it includes the interpreter, torch and the model weights, for both
  models alike (``base_rss_gb`` is the RSS after building the model, before the first step).
* CUDA: ``torch.cuda.max_memory_allocated`` inside the child.

Timing: forward (incl. loss) and backward are timed separately, each the median over ``repeats``
steps after ``warmup`` untimed steps. ``train`` configs also time an AdamW step and report
images/s for the whole train step. The HF peer is ``Swinv2ForImageClassification`` built from a
local ``Swinv2Config`` (random weights, nothing downloaded) with the same variant geometry.

Examples::

    python scripts/bench.py                       # the full set (1536^2 runs: ~17 GB for the HF peer)
    python scripts/bench.py --quick --out q.json  # seconds; what the tests run
    python scripts/bench.py --configs t256_fused,t256_hf --repeats 5
    python scripts/bench.py --list
    python scripts/bench.py --configs hr_seq_ckpt --reuse bench.json --out bench.json  # rerun one, keep the rest
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from swinv2_tools.bench_meta import bench_metadata, summary_line

RESULT_TAG = "BENCH_RESULT "

# name -> config. group: rows of one group are compared with the group's HF ("peer") row.
# mode "train": forward + backward + AdamW step; "fwdbwd": forward + backward only.
_T256 = dict(group="train256_b8", variant="tiny", img=256, window=8, batch=8, mode="train", warmup=1, repeats=3)
_HR = dict(group="hires1536_b1", variant="tiny", img=1536, window=24, batch=1, mode="fwdbwd", warmup=0, repeats=1)
# window 32 (the paper's 1536^2 COCO window): 1024^2 is the largest classification input it tiles
_W32 = dict(group="w32_1024_b1", variant="tiny", img=1024, window=32, batch=1, mode="fwdbwd", warmup=0, repeats=1)
_MID = dict(group="mid768_b1", variant="tiny", img=768, window=24, batch=1, mode="fwdbwd", warmup=0, repeats=1)
# quick: a narrow, shallow SwinV2 (same overrides for both models) so a smoke run takes seconds
_Q = dict(group="quick", variant="tiny", img=64, window=4, batch=2, mode="fwdbwd", warmup=0, repeats=1,
          overrides=dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)))

CONFIGS: dict[str, dict[str, Any]] = {
    "t256_hf": dict(_T256, model="hf"),
    "t256_reference": dict(_T256, model="ours", attention="reference"),
    "t256_fused": dict(_T256, model="ours", attention="fused"),
    "t256_sequential": dict(_T256, model="ours", attention="sequential"),
    "hr_hf": dict(_HR, model="hf"),
    "hr_hf_ckpt": dict(_HR, model="hf", ckpt=True),
    "hr_reference": dict(_HR, model="ours", attention="reference"),
    "hr_reference_ckpt": dict(_HR, model="ours", attention="reference", ckpt=True),
    "hr_fused": dict(_HR, model="ours", attention="fused"),
    "hr_fused_ckpt": dict(_HR, model="ours", attention="fused", ckpt=True),
    "hr_sequential": dict(_HR, model="ours", attention="sequential"),
    "hr_sequential_ckpt": dict(_HR, model="ours", attention="sequential", ckpt=True),
    # checkpointing policies side by side (none = hr_fused, block = hr_fused_ckpt): not in the default set
    "hr_fused_ckpt_half": dict(_HR, model="ours", attention="fused", ckpt=True, ckpt_granularity="half"),
    "hr_fused_ckpt_selective": dict(_HR, model="ours", attention="fused", ckpt=True, ckpt_granularity="selective"),
    "w32_hf": dict(_W32, model="hf"),
    "w32_fused": dict(_W32, model="ours", attention="fused"),
    "w32_sequential": dict(_W32, model="ours", attention="sequential"),
    "w32_sequential_ckpt": dict(_W32, model="ours", attention="sequential", ckpt=True),
    # development size (not in the default set): the 1536 geometry at a quarter of the tokens
    "mid_hf": dict(_MID, model="hf"),
    "mid_reference": dict(_MID, model="ours", attention="reference"),
    "mid_fused": dict(_MID, model="ours", attention="fused"),
    "mid_sequential": dict(_MID, model="ours", attention="sequential"),
    "mid_sequential_ckpt": dict(_MID, model="ours", attention="sequential", ckpt=True),
    "mid_fused_ckpt": dict(_MID, model="ours", attention="fused", ckpt=True),
    "mid_fused_ckpt_half": dict(_MID, model="ours", attention="fused", ckpt=True, ckpt_granularity="half"),
    "mid_fused_ckpt_selective": dict(_MID, model="ours", attention="fused", ckpt=True, ckpt_granularity="selective"),
    "quick_hf": dict(_Q, model="hf"),
    "quick_fused": dict(_Q, model="ours", attention="fused"),
    "quick_sequential": dict(_Q, model="ours", attention="sequential", ckpt=True),
}
# The default run: everything except the optional HF-with-checkpointing row (another ~17 GB run).
DEFAULT = [n for n in CONFIGS if not n.startswith(("quick", "mid")) and n != "hr_hf_ckpt"
           and not n.endswith(("_ckpt_half", "_ckpt_selective"))]
QUICK = [n for n in CONFIGS if n.startswith("quick")]


# ---------------------------------------------------------------------------------------------
# child side: build one model, run the steps, print one JSON line
# ---------------------------------------------------------------------------------------------
def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (e.g. "VmHWM", "VmRSS") in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_model(cfg: dict[str, Any]):
    """(model, forward(x) -> logits) for a config; weights random, same geometry for both models."""
    import torch  # noqa: F401
    import swinv2

    v = {**swinv2.VARIANTS[cfg["variant"]], **cfg.get("overrides", {})}
    if cfg["model"] == "hf":
        from transformers import Swinv2Config, Swinv2ForImageClassification

        hc = Swinv2Config(image_size=cfg["img"], patch_size=4, num_channels=3, embed_dim=v["embed_dim"],
                          depths=list(v["depths"]), num_heads=list(v["num_heads"]), window_size=cfg["window"],
                          mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.1, num_labels=1000)
        model = Swinv2ForImageClassification(hc)
        if cfg.get("ckpt"):
            model.gradient_checkpointing_enable()
        return model, lambda x: model(pixel_values=x).logits
    model = swinv2.create_model(cfg["variant"], img_size=cfg["img"], window_size=cfg["window"], num_classes=1000,
                                attention=cfg["attention"], drop_path_rate=0.1, **cfg.get("overrides", {}),
                                **({"sequential_chunk": cfg["chunk"]} if cfg.get("chunk") else {}))
    if cfg.get("ckpt"):
        swinv2.apply_activation_checkpointing(model, every=1, granularity=cfg.get("ckpt_granularity", "block"))
    return model, model


def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    device = torch.device(cfg.get("device", "cpu"))
    torch.manual_seed(0)
    model, fwd = build_model(cfg)
    model.to(device).train()
    nparams = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["batch"], 3, cfg["img"], cfg["img"], generator=g).to(device)
    y = torch.randint(0, 1000, (cfg["batch"],), generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if cfg["mode"] == "train" else None
    amp = cfg.get("precision", "fp32") == "bf16"
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    base_rss = _proc_status_bytes("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fw, bw, st, us, sy, mf = [], [], [], [], [], []
    for i in range(cfg["warmup"] + cfg["repeats"]):
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        sync(); t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(fwd(x).float(), y)
        sync(); t1 = time.perf_counter()
        loss.backward()
        sync(); t2 = time.perf_counter()
        if opt is not None:
            opt.step()
        for p in model.parameters():  # zero_grad(set_to_none) for both modes
            p.grad = None
        sync(); t3 = time.perf_counter()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        if i >= cfg["warmup"]:
            fw.append(t1 - t0); bw.append(t2 - t1); st.append(t3 - t0)
            us.append(ru1.ru_utime - ru0.ru_utime); sy.append(ru1.ru_stime - ru0.ru_stime)
            mf.append(ru1.ru_minflt - ru0.ru_minflt)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()}")
    out = dict(
        fwd_s=statistics.median(fw), bwd_s=statistics.median(bw), step_s=statistics.median(st),
        fwd_all=fw, bwd_all=bw, step_all=st, loss=float(loss), params=nparams,
        threads=torch.get_num_threads(), base_rss_gb=(base_rss or 0) / 1e9,
        vm_hwm_gb=(_proc_status_bytes("VmHWM") or 0) / 1e9,
    )
    out["images_per_s"] = cfg["batch"] / out["step_s"]
    out.update(cpu_user_s=statistics.median(us), cpu_sys_s=statistics.median(sy),
               minor_faults=statistics.median(mf))
    if cfg.get("profile"):
        out.update(_profile_gemm(fwd, x, y, model, amp, device))
    if cuda:
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


# Matrix products: the FLOPs of every SwinV2 implementation (linear layers: the same shapes in both
# models). Self time of these ops in one profiled fwd+bwd is a floor for that step on this machine
# with torch's GEMMs, whatever happens around them.
LINEAR_GEMM_OPS = ("aten::mm", "aten::addmm")
ATTENTION_GEMM_OPS = ("aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                      "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def _profile_gemm(fwd, x, y, model, amp: bool, device) -> dict[str, float]:
    """One more forward+backward under torch.profiler: seconds of self time in GEMM ops vs all ops."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(fwd(x).float(), y)
        loss.backward()
    for p in model.parameters():
        p.grad = None
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    pick = lambda names: sum(e.self_cpu_time_total for e in events if e.key in names) / 1e6  # noqa: E731
    return dict(profiled_self_s=total / 1e6, linear_gemm_s=pick(LINEAR_GEMM_OPS),
                attention_gemm_s=pick(ATTENTION_GEMM_OPS))


# ---------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------
def spawn(cfg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run one config in a fresh interpreter; returns its result plus the child's peak RSS."""
    env = dict(os.environ)
    if cfg.get("malloc_mmap_threshold"):  # glibc: fixed threshold, freed big blocks go back to the OS
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(cfg["malloc_mmap_threshold"]))
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.time()
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)],
                             stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = None if timeout is None else t0 + timeout
        while True:  # wait4 gives THIS child's rusage (RUSAGE_CHILDREN would be the max over all)
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.time() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    res: dict[str, Any] = dict(cfg)
    res["wall_s"] = time.time() - t0
    res["peak_rss_gb"] = ru.ru_maxrss * 1024 / 1e9  # Linux: KiB
    lines = [ln for ln in text.splitlines() if ln.startswith(RESULT_TAG)]
    if p.returncode != 0 or not lines:
        res["error"] = f"exit {p.returncode}: " + "\n".join(text.strip().splitlines()[-15:])
        return res
    res.update(json.loads(lines[-1][len(RESULT_TAG):]))
    return res


def add_ratios(results: list[dict[str, Any]]) -> None:
    """time_ratio = ours/peer (lower is better); mem_ratio = peak ours/peer; speedup = peer/ours."""
    peers = {r["group"]: r for r in results if r["model"] == "hf" and not r.get("ckpt") and "error" not in r}
    for r in results:
        p = peers.get(r["group"])
        if p is None or "error" in r:
            continue
        r["time_ratio_vs_peer"] = r["step_s"] / p["step_s"]
        r["fwdbwd_ratio_vs_peer"] = (r["fwd_s"] + r["bwd_s"]) / (p["fwd_s"] + p["bwd_s"])
        r["images_per_s_ratio_vs_peer"] = r["images_per_s"] / p["images_per_s"]
        mem = "peak_cuda_gb" if "peak_cuda_gb" in r else "peak_rss_gb"
        r["mem_ratio_vs_peer"] = r[mem] / p[mem]


def format_table(results: list[dict[str, Any]]) -> str:
    hdr = ["config", "model", "kernel", "ckpt", "fwd s", "bwd s", "step s", "img/s", "peak GB", "base GB",
           "fwd+bwd/peer", "img/s/peer", "mem/peer", "cpu user/sys s", "GEMM s (lin+attn)"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["name"], r["model"], r.get("attention", "-"), "y" if r.get("ckpt") else "n"] +
                        ["ERROR"] + [""] * (len(hdr) - 5))
            continue
        peak = r.get("peak_cuda_gb", r["peak_rss_gb"])

        def f(k, fmt="{:.2f}"):
            return fmt.format(r[k]) if k in r else "-"
        ckpt = r.get("ckpt_granularity", "block") if r.get("ckpt") else "n"
        rows.append([r["name"], r["model"], r.get("attention", "-"), ckpt,
                     f("fwd_s"), f("bwd_s"), f("step_s"), f("images_per_s"), f"{peak:.2f}", f("base_rss_gb"),
                     f("fwdbwd_ratio_vs_peer", "{:.3f}x"), f("images_per_s_ratio_vs_peer", "{:.2f}x"),
                     f("mem_ratio_vs_peer", "{:.3f}x"),
                     f"{r['cpu_user_s']:.1f}/{r['cpu_sys_s']:.1f}" if "cpu_user_s" in r else "-",
                     f"{r['linear_gemm_s'] + r['attention_gemm_s']:.2f} ({r['linear_gemm_s']:.2f}+"
                     f"{r['attention_gemm_s']:.2f})" if "linear_gemm_s" in r else "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(hdr), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=None, help="comma-separated config names (see --list); default: full set")
    ap.add_argument("--quick", action="store_true", help="tiny 64x64 inputs, 1 repeat: a smoke run (tests)")
    ap.add_argument("--list", action="store_true", help="print the config names and exit")
    ap.add_argument("--repeats", type=int, default=None, help="override timed repeats of every config")
    ap.add_argument("--warmup", type=int, default=None, help="override untimed warm-up steps of every config")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--chunk", type=int, default=None, help="sequential_chunk for our model")
    ap.add_argument("--ckpt-granularity", default=None, choices=["block", "half", "selective"],
                    help="apply_activation_checkpointing granularity for our *_ckpt configs (default block)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="run the children with glibc MALLOC_MMAP_THRESHOLD_=BYTES (allocations >= BYTES are "
                         "mmap'ed and unmapped on free, so RSS follows live memory; default: glibc's dynamic "
                         "threshold, as every recorded number unless the row says otherwise)")
    ap.add_argument("--profile", action="store_true",
                    help="CPU: after the timed steps, one more fwd+bwd under torch.profiler; reports the self "
                         "time of the matrix products (linear layers; attention) = a floor for that step")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per config (killed after)")
    ap.add_argument("--reuse", default=None, help="JSON of an earlier run: keep its rows for configs not rerun")
    ap.add_argument("--out", default=None, help="write results JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        res = run_child(json.loads(args.child))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0
    if args.list:
        for n, c in CONFIGS.items():
            print(f"{n:22s} {c}")
        return 0
    names = QUICK if args.quick else DEFAULT
    if args.configs:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; valid: {', '.join(CONFIGS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench.py: --device cuda requested but torch.cuda.is_available() is False", file=sys.stderr)
            return 2
        if args.profile:
            ap.error("--profile measures CPU op time; on CUDA use bench_gpu.py or nsys")

    info = bench_metadata(__file__, argv, packages=["transformers"])
    results: list[dict[str, Any]] = []
    for n in names:
        cfg = dict(CONFIGS[n], name=n, device=args.device, precision=args.precision)
        for k in ("repeats", "warmup", "chunk"):
            if getattr(args, k) is not None:
                cfg[k] = getattr(args, k)
        if args.malloc_mmap_threshold:
            cfg["malloc_mmap_threshold"] = args.malloc_mmap_threshold
        if args.profile:
            cfg["profile"] = True
        if args.ckpt_granularity is not None and cfg.get("ckpt") and cfg["model"] == "ours":
            cfg["ckpt_granularity"] = args.ckpt_granularity
        load_before = os.getloadavg()
        print(f"[bench] {n}: {cfg['model']} {cfg['variant']} {cfg['img']}^2/W{cfg['window']} b{cfg['batch']} "
              f"{cfg.get('attention', '')} ckpt={bool(cfg.get('ckpt'))} load={load_before[0]:.2f}", flush=True)
        r = spawn(cfg, timeout=args.timeout)
        r["loadavg_before"], r["loadavg_after"] = list(load_before), list(os.getloadavg())
        if "error" in r:
            print(f"[bench] {n} FAILED: {r['error']}", flush=True)
        else:
            print(f"[bench] {n}: fwd {r['fwd_s']:.2f}s bwd {r['bwd_s']:.2f}s step {r['step_s']:.2f}s "
                  f"peak {r.get('peak_cuda_gb', r['peak_rss_gb']):.2f} GB", flush=True)
        results.append(r)
    if args.reuse:
        old = json.loads(Path(args.reuse).read_text())
        kept = [r for r in old.get("results", []) if r.get("name") not in names]
        results = kept + results
        info["reused_rows_from"] = {"file": args.reuse, "meta": old.get("meta"),
                                    "names": [r["name"] for r in kept]}
    order = {n: i for i, n in enumerate(CONFIGS)}
    results.sort(key=lambda r: order.get(r.get("name"), 1 << 30))
    add_ratios(results)
    print()
    print(f"{summary_line(info)}  transformers {info['transformers']}  loadavg now {os.getloadavg()}")
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": info, "results": results}, indent=1))
        print(f"wrote {args.out}")
    return 1 if any("error" in r for r in results if r.get("name") in names) else 0


if __name__ == "__main__":
    sys.exit(main())

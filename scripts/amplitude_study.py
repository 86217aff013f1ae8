"""Post-norm stability study: {res_post, pre} x {cosine, dot} on a deep, narrow SwinV2.

    python -m swinv2_tools.amplitude_study --out runs/stability [--steps 100] [--depth 24]
        [--lrs 1e-3,1e-2] [--variants all] [--jobs 1] [--figures-dir DIR] [--quick] [--plot-only]

Every variant is a real `swinv2-train experiment=stability ...` run (configs/experiment/stability.yaml)
started as a subprocess with overrides for the variant, the learning rate, the depth of stage 3
and the budget; seeds and data are identical across variants. Subprocesses, not in-process calls,
because each run initialises its own (gloo) process group, DeepSpeed engine and Hydra state, which
are process-global; a run that dies cannot take the study down with it; `--jobs N` is then plain
process parallelism; and what is measured is exactly the command a user runs.

`train.nan_policy=skip` with a very large `train.max_consecutive_nonfinite` makes a diverging run
keep going with its non-finite updates skipped (they are counted in `train/nonfinite_steps`), so
divergence is recorded in the summary instead of ending the study. A run that still exits non-zero
is recorded with its return code and whatever it logged.

Outputs in --out: `runs/<name>/` (trainer run dirs: metrics.jsonl, config.yaml, train.log),
`logs/<name>.log` (stdout+stderr), `summary.json`, `summary.md` (the table in docs/STABILITY.md) and
the figures (in --figures-dir, default OUT/figures):
`amplitude_lr<lr>.png` (per variant: mean|x| and max|x| vs block index at several steps, log y),
`loss.png` (train loss of the four variants, one panel per LR), `logit_scale.png` (learned
attention scale per block over training, cosine variants), `amplitude_ratio.png`.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from swinv2_tools.amplitude_report import (
    LOGIT_SCALE_LABEL, _json_safe, draw_logit_scale_panel, draw_loss, load_run, summarize_run)
from swinv2_tools.bench_meta import git_commit
from swinv2_train.amplitudes import draw_amplitude_panel, plt_agg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the trainers' working directory

VARIANTS = [  # (norm_style, attn_type); the first is SwinV2, the last is V1-style
    ("res_post", "cosine"),
    ("res_post", "dot"),
    ("pre", "cosine"),
    ("pre", "dot"),
]
QUICK_VARIANTS = [("res_post", "cosine"), ("pre", "dot")]
COLORS = {("res_post", "cosine"): "tab:blue", ("res_post", "dot"): "tab:cyan",
          ("pre", "cosine"): "tab:orange", ("pre", "dot"): "tab:red"}


def variant_name(norm: str, attn: str, lr: float) -> str:
    return f"lr{lr:g}_{norm}_{attn}"


def variant_label(norm: str, attn: str) -> str:
    return f"{'res-post-norm' if norm == 'res_post' else 'pre-norm'} + {'cosine' if attn == 'cosine' else 'dot'} attn"


# ----------------------------------------------------------------------------- the trainer
def trainer_command() -> List[str]:
    """`swinv2-train`, as `python -m swinv2_train.main` of this interpreter."""
    return [sys.executable, "-m", "swinv2_train.main"]


def build_overrides(*, norm: str, attn: str, lr: float, steps: int, depth: int, run_dir: str, seed: int,
                    probe_every: int, quick: bool) -> List[str]:
    ov = ["experiment=stability", f"model.norm_style={norm}", f"model.attn_type={attn}",
          f"model.depths=[1,1,{depth},1]", f"optim.lr={lr:g}", f"train.max_steps={steps}",
          f"train.probe_every={probe_every}", f"run.dir={run_dir}", f"run.seed={seed}", "run.resume=never",
          "train.progress=lines", "train.nan_policy=skip", "train.max_consecutive_nonfinite=1000000"]
    if quick:  # seconds, not minutes: small batch, warmup shorter than the run
        ov += ["train.batch_size=8", "train.eval_batch_size=128", "train.log_every=1",
               "sched.warmup_steps=1"]
    return ov


_LIVE: set = set()  # trainer subprocesses now running
_STOP = threading.Event()  # set on SIGTERM: queued variants are not started


def _terminate_children(signum, frame):
    _STOP.set()
    for proc in list(_LIVE):
        proc.terminate()
    for proc in list(_LIVE):
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    sys.exit(128 + signum)


def run_variant(spec: Dict[str, Any], env: Dict[str, str]) -> Dict[str, Any]:
    """One trainer subprocess; returns the spec + rc + wall time (+ the run's summary)."""
    run_dir, log_path = spec["run_dir"], spec["log"]
    if _STOP.is_set():
        return {**spec, "rc": None, "wall_s": 0.0, "summary": {}, "crashed": True, "command": ""}
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # fresh: never resume or append to an older run of the study
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    cmd = trainer_command() + spec["overrides"]
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _LIVE.add(proc)
        try:
            rc = proc.wait()
        finally:
            _LIVE.discard(proc)
    res = {**spec, "rc": rc, "wall_s": time.time() - t0, "command": "swinv2-train " + " ".join(spec["overrides"])}
    try:
        run = load_run(run_dir)
        res["summary"] = summarize_run(run["records"], run["depths"])
    except FileNotFoundError:
        res["summary"] = {"diverged": None, "error": "no metrics.jsonl"}
    res["crashed"] = rc != 0
    return res


def same_setup(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Check from the resolved config.yaml files that every run had the same data, seed, budget and
    model apart from norm_style / attn_type (the working tree may change while a study runs)."""
    from omegaconf import OmegaConf

    from swinv2_train.rundir import RunDir
    prints = {}
    for r in results:
        path = RunDir(r["run_dir"]).config
        if not os.path.exists(path):
            continue
        c = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        model = {k: v for k, v in c["model"].items() if k not in ("norm_style", "attn_type")}
        key = {"data": c["data"], "model": model, "seed": c["run"]["seed"],
               "train": {k: c["train"][k] for k in ("batch_size", "max_steps", "probe_every", "precision")},
               "optim": {k: v for k, v in c["optim"].items() if k != "lr"}}
        prints[r["name"]] = json.dumps(key, sort_keys=True)
    groups = sorted(set(prints.values()))
    return {"identical": len(groups) == 1,
            "differing_runs": [] if len(groups) <= 1 else
            [n for n, v in prints.items() if v != max(groups, key=list(prints.values()).count)]}


# ----------------------------------------------------------------------------- figures
def _records(res: Dict[str, Any]) -> Dict[str, Any]:
    try:
        return load_run(res["run_dir"])
    except FileNotFoundError:
        return {"records": [], "depths": None}


def plot_study(results: List[Dict[str, Any]], fig_dir: str) -> Dict[str, str]:
    plt = plt_agg()
    os.makedirs(fig_dir, exist_ok=True)
    lrs = sorted({r["lr"] for r in results})
    variants = [v for v in VARIANTS if any((r["norm"], r["attn"]) == v for r in results)]
    by = {(r["lr"], r["norm"], r["attn"]): r for r in results}
    runs = {k: _records(v) for k, v in by.items()}
    out: Dict[str, str] = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        out[name] = os.path.join(fig_dir, f"{name}.png")
        fig.savefig(out[name], dpi=100)
        plt.close(fig)

    # amplitude vs block index, per LR: rows = stat, cols = variant, shared y per row
    for lr in lrs:
        fig, axes = plt.subplots(2, len(variants), figsize=(4.2 * len(variants), 7.5), sharey="row", squeeze=False)
        for c, (norm, attn) in enumerate(variants):
            run = runs.get((lr, norm, attn))
            if run is None:
                continue
            s = by[(lr, norm, attn)]["summary"]
            tag = " [DIVERGED]" if s.get("diverged") else ""
            for r_, stat in enumerate(("mean_abs", "max")):
                draw_amplitude_panel(axes[r_][c], run["records"], stat, run["depths"],
                                     title=f"{variant_label(norm, attn)}{tag}\n{stat}")
        fig.suptitle(f"Activation amplitude of each block output over training (lr {lr:g})", fontsize=11)
        save(fig, f"amplitude_lr{lr:g}")

    # loss curves: one panel per LR, the variants overlaid
    fig, axes = plt.subplots(1, len(lrs), figsize=(6 * len(lrs), 4.2), squeeze=False)
    for c, lr in enumerate(lrs):
        ax = axes[0][c]
        for norm, attn in variants:
            run = runs.get((lr, norm, attn))
            if run is not None:
                draw_loss(ax, run["records"], label=variant_label(norm, attn), color=COLORS[(norm, attn)])
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss (cross-entropy)")
        ax.set_title(f"lr {lr:g}", fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8)
    save(fig, "loss")

    # logit scales: rows = LR, cols = cosine variants
    cos = [v for v in variants if v[1] == "cosine"]
    if cos:
        fig, axes = plt.subplots(len(lrs), len(cos), figsize=(6 * len(cos), 4 * len(lrs)), squeeze=False)
        for r_, lr in enumerate(lrs):
            for c, (norm, attn) in enumerate(cos):
                run = runs.get((lr, norm, attn))
                if run is not None:
                    draw_logit_scale_panel(axes[r_][c], run["records"], run["depths"],
                                           title=f"{variant_label(norm, attn)}, lr {lr:g}")
        fig.suptitle("Learned attention scale per block over training (" + LOGIT_SCALE_LABEL.replace("\n", " ") + ")",
                     fontsize=9)
        save(fig, "logit_scale")

    # end-of-training ratio last/first block of the deep stage (mean |x|), grouped by LR
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.8 / max(1, len(variants))
    for i, (norm, attn) in enumerate(variants):
        xs, ys = [], []
        for j, lr in enumerate(lrs):
            s = by.get((lr, norm, attn), {}).get("summary", {})
            v = s.get("mean_abs_ratio_deep_stage")
            if v is not None and math.isfinite(v):
                xs.append(j + (i - (len(variants) - 1) / 2) * w)
                ys.append(v)
        ax.bar(xs, ys, width=w, color=COLORS[(norm, attn)], label=variant_label(norm, attn))
    ax.axhline(1.0, color="0.4", lw=0.8)
    ax.set_xticks(range(len(lrs)), [f"lr {lr:g}" for lr in lrs])
    ax.set_yscale("log")
    ax.set_ylabel("mean|x|: last / first block of stage 3\n(end of training)")
    ax.grid(True, axis="y", which="both", alpha=0.25)
    ax.legend(fontsize=8)
    save(fig, "amplitude_ratio")
    return out


# ----------------------------------------------------------------------------- table
def _fmt(v, spec=".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def summary_table(results: List[Dict[str, Any]]) -> str:
    rows = ["| lr | norm | attention | mean\\|x\\| last/first (stage 3) | max\\|x\\| last/first (stage 3) "
            "| mean\\|x\\| last/first (all blocks) | max mean\\|x\\| over blocks | final train loss "
            "| loss final/first | loss max/first | non-finite steps | diverged | failed to train | val top-1 (%) "
            "| rc | wall (s) |",
            "|" + "---|" * 16]
    for r in sorted(results, key=lambda r: (r["lr"], VARIANTS.index((r["norm"], r["attn"])))):
        s = r["summary"]
        rows.append("| " + " | ".join([
            f"{r['lr']:g}", r["norm"], r["attn"], _fmt(s.get("mean_abs_ratio_deep_stage")),
            _fmt(s.get("max_ratio_deep_stage")), _fmt(s.get("mean_abs_ratio_all")),
            _fmt(s.get("mean_abs_max_over_layers")), _fmt(s.get("final_loss"), ".4f"),
            _fmt(s.get("final_over_first_loss"), ".2f"), _fmt(s.get("max_over_first_loss"), ".2f"),
            str(s.get("nonfinite_steps", "–")), "**yes**" if s.get("diverged") else "no",
            "**yes**" if s.get("failed_to_train") else "no",
            _fmt(s.get("final_val_top1"), ".2f"), str(r["rc"]), f"{r['wall_s']:.0f}"]) + " |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Post-norm stability study (see docs/STABILITY.md)")
    p.add_argument("--out", default="runs/stability", help="study folder (run dirs, logs, summary)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 100; quick 3)")
    p.add_argument("--depth", type=int, default=None, help="blocks in stage 3 (default 24; quick 2)")
    p.add_argument("--lrs", default=None, help="comma-separated peak LRs (default 1e-3,1e-2; quick 1e-3)")
    p.add_argument("--variants", default=None,
                   help="comma-separated norm:attn pairs, or 'all' (default all; quick res_post:cosine,pre:dot)")
    p.add_argument("--probe-every", "--amp-every", type=int, default=None, help="amplitude logging interval (default steps/10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time (default 1: sequential)")
    p.add_argument("--figures-dir", default=None, help="where the PNGs go (default OUT/figures)")
    p.add_argument("--quick", action="store_true", help="tiny budget for tests: 2 variants, 3 steps, depth 2")
    p.add_argument("--plot-only", action="store_true",
                   help="train nothing: redo figures and summary from OUT/summary.json's existing run dirs")
    a = p.parse_args(argv)
    a.steps = a.steps or (3 if a.quick else 100)
    a.depth = a.depth or (2 if a.quick else 24)
    a.lrs = [float(x) for x in (a.lrs or ("1e-3" if a.quick else "1e-3,1e-2")).split(",")]
    if a.variants in (None, "all"):
        a.variants = QUICK_VARIANTS if (a.quick and a.variants is None) else VARIANTS
    else:
        a.variants = [tuple(v.split(":")) for v in a.variants.split(",")]
        for v in a.variants:
            if v not in VARIANTS:
                p.error(f"--variants: {':'.join(v)} is not one of " + ", ".join(":".join(x) for x in VARIANTS))
    a.probe_every = a.probe_every or max(1, a.steps // 10)
    if a.jobs < 1:
        p.error("--jobs must be >= 1")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate_children)  # `kill PID` ends the running trainers too
    out = os.path.abspath(a.out)
    fig_dir = os.path.abspath(a.figures_dir or os.path.join(out, "figures"))
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ)
    if a.jobs > 1:  # share the cores instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // a.jobs)))
    specs = []
    for lr in a.lrs:
        for norm, attn in a.variants:
            name = variant_name(norm, attn, lr)
            run_dir = os.path.join(out, "runs", name)
            specs.append({"name": name, "lr": lr, "norm": norm, "attn": attn, "run_dir": run_dir,
                          "log": os.path.join(out, "logs", name + ".log"),
                          "overrides": build_overrides(norm=norm, attn=attn, lr=lr, steps=a.steps, depth=a.depth,
                                                       run_dir=run_dir, seed=a.seed, probe_every=a.probe_every,
                                                       quick=a.quick)})
    print(f"amplitude study: {len(specs)} runs ({a.steps} steps, stage-3 depth {a.depth}, lrs {a.lrs}, "
          f"jobs {a.jobs}) -> {out}", flush=True)
    t0 = time.time()
    results: List[Dict[str, Any]] = []
    if a.plot_only:
        with open(os.path.join(out, "summary.json")) as f:
            old = {r["name"]: r for r in json.load(f)["runs"]}
        for s in specs:
            r = {**s, **{k: old[s["name"]][k] for k in ("rc", "crashed", "wall_s", "command")}}
            run = load_run(s["run_dir"])
            r["summary"] = summarize_run(run["records"], run["depths"])
            results.append(r)
        specs_to_run = []
    else:
        specs_to_run = specs
    with cf.ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futs = {pool.submit(run_variant, s, env): s for s in specs_to_run}
        for f in cf.as_completed(futs):
            r = f.result()
            s = r["summary"]
            print(f"  {r['name']:28s} rc={r['rc']} {r['wall_s']:.0f}s diverged={s.get('diverged')} "
                  f"failed_to_train={s.get('failed_to_train')} ratio(stage3 mean|x|)={_fmt(s.get('mean_abs_ratio_deep_stage'))} "
                  f"top1={_fmt(s.get('final_val_top1'), '.2f')}", flush=True)
            results.append(r)
    results.sort(key=lambda r: specs.index(next(s for s in specs if s["name"] == r["name"])))
    figures = plot_study(results, fig_dir)
    table = summary_table(results)
    summary = {"config": {"steps": a.steps, "depth": a.depth, "lrs": a.lrs, "seed": a.seed,
                          "probe_every": a.probe_every, "quick": a.quick, "jobs": a.jobs,
                          "variants": [list(v) for v in a.variants],
                          "trainer": " ".join(trainer_command()[1:])},
               "git_head": git_commit(), "same_setup": same_setup(results),
               "wall_s": time.time() - t0, "figures": figures,
               "runs": [{k: r[k] for k in ("name", "lr", "norm", "attn", "run_dir", "rc", "crashed", "wall_s",
                                           "command", "summary")} for r in results]}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(_json_safe(summary), f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    if not summary["same_setup"]["identical"]:
        print("WARNING: runs differ in more than the variant (data/model/budget): "
              + ", ".join(summary["same_setup"]["differing_runs"]))
    print(f"figures: {', '.join(figures.values())}\nsummary: {os.path.join(out, 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Amplitude report for any `swinv2-train` run directory.

    swinv2-amplitude-report RUN_DIR [--out DIR]
    python -m swinv2_tools.amplitude_report RUN_DIR [--out DIR]

Reads RUN_DIR/metrics.jsonl (the trainer's `amplitude/NN/{mean_abs,rms,max}` and `logit_scale/NN` keys,
see train/amplitudes.py) and RUN_DIR/config.yaml when present (for stage boundaries), and writes:

- `amplitude_layers.png`: activation amplitude of every block output versus block index, mean |x|
  and max |x| side by side, one curve per logged step (log y), as in Figure 2 of the SwinV2 paper;
- `loss.png`: training loss over steps (non-finite steps marked);
- `logit_scale.png`: the learned attention scale s = exp(clamp(logit_scale, max=ln 100)) = 1/tau,
  mean over heads, per block, one curve per logged step (cosine attention only; skipped otherwise);
- `amplitude_summary.json`: the numbers behind the plots (`summarize_run`).

The functions here (`load_run`, `summarize_run`, `plot_*`) are also used by scripts/amplitude_study.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from swinv2_train.amplitudes import (amplitudes_by_step, draw_amplitude_panel, mark_stages, pick_steps,
                              plt_agg, stage_ranges)
from swinv2_train.metrics import read_jsonl
from swinv2_train.rundir import LOGIT_SCALE_KEY_RE, VAL_LOSS, VAL_TOP1, RunDir

AMP_STATS = ("mean_abs", "max")
LOSS_EXPLOSION_FACTOR = 2.0  # a logged train loss above this x the first one counts as an explosion
FAILED_TO_TRAIN_FACTOR = 0.9  # final train loss above this x the first one: learned (almost) nothing


# ----------------------------------------------------------------------------- reading
def _depths_from_config(run_dir: str) -> Optional[List[int]]:
    path = RunDir(run_dir).config
    if not os.path.exists(path):
        return None
    try:
        from omegaconf import OmegaConf
        cfg = OmegaConf.load(path)
        depths = cfg.model.get("depths")
        if depths is None:
            import swinv2
            depths = swinv2.VARIANTS[cfg.model.variant]["depths"]
        return [int(d) for d in depths]
    except Exception:  # a foreign or partial config: plots just lose the stage marks
        return None


def load_run(run_dir: str) -> Dict[str, Any]:
    """{"records": [...], "depths": [..] or None, "run_dir": ...}; raises FileNotFoundError."""
    path = RunDir(run_dir).metrics
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return {"records": read_jsonl(path), "depths": _depths_from_config(run_dir), "run_dir": run_dir}


def logit_scales_by_step(records: Sequence[dict]) -> Dict[int, Dict[int, float]]:
    """{step: {block: mean over heads of exp(clamped logit_scale)}}."""
    out: Dict[int, Dict[int, float]] = {}
    for rec in records:
        for k, v in rec.items():
            m = LOGIT_SCALE_KEY_RE.match(k)
            if m:
                out.setdefault(int(rec["step"]), {})[int(m.group(1))] = float(v)
    return out


def loss_curve(records: Sequence[dict], key: str = "train/loss") -> List[tuple]:
    """[(step, value)] in step order, the last record per step winning."""
    by = {int(r["step"]): float(r[key]) for r in records if key in r}
    return sorted(by.items())


def _finite(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# ----------------------------------------------------------------------------- numbers
def summarize_run(records: Sequence[dict], depths: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """The numbers of one run: final amplitudes and last/first ratios, loss, divergence, accuracy.

    ratio_all: last block / first block (crosses patch merging, whose LayerNorm resets the scale);
    ratio_deep_stage: last / first block of the deepest stage, the paper's "deeper layers" view.
    diverged: any non-finite loss or skipped (non-finite) step, or a logged train loss above
    LOSS_EXPLOSION_FACTOR x the first logged one. failed_to_train: the last finite train loss is
    above FAILED_TO_TRAIN_FACTOR x the first (e.g. stuck at chance level), diverged or not.
    """
    out: Dict[str, Any] = {}
    losses = loss_curve(records)
    nonfinite = max([int(r.get("train/nonfinite_steps", 0) or 0) for r in records
                     if _finite(r.get("train/nonfinite_steps", 0))] or [0])
    nonfinite_loss = [s for s, v in losses if not _finite(v)]
    finite = [(s, v) for s, v in losses if _finite(v)]
    first_loss = finite[0][1] if finite else float("nan")
    max_loss = max((v for _, v in finite), default=float("nan"))
    exploded = bool(finite) and max_loss > LOSS_EXPLOSION_FACTOR * first_loss
    final_loss = losses[-1][1] if losses else float("nan")
    final_finite = finite[-1][1] if finite else float("nan")
    out.update(first_loss=first_loss, final_loss=final_loss,
               max_loss=max_loss, nonfinite_steps=max(nonfinite, len(nonfinite_loss)),
               final_over_first_loss=final_finite / first_loss if finite else float("nan"),
               max_over_first_loss=max_loss / first_loss if finite else float("nan"),
               failed_to_train=bool(finite) and not (final_finite <= FAILED_TO_TRAIN_FACTOR * first_loss),
               first_nonfinite_step=nonfinite_loss[0] if nonfinite_loss else None,
               loss_exploded=exploded,
               diverged=bool(nonfinite or nonfinite_loss or exploded),
               steps=losses[-1][0] if losses else 0)
    val = [r for r in records if VAL_TOP1 in r]
    out["final_val_top1"] = float(val[-1][VAL_TOP1]) if val else None
    out["final_val_loss"] = float(val[-1][VAL_LOSS]) if val and VAL_LOSS in val[-1] else None

    stages = [r for r in stage_ranges(depths) if len(r)]
    deep = max(stages, key=len) if stages else None
    for stat in AMP_STATS + ("rms",):
        by_step = amplitudes_by_step(records, stat)
        if not by_step:
            continue
        last_step = max(by_step)
        amps = by_step[last_step]
        layers = sorted(amps)
        first, last = amps[layers[0]], amps[layers[-1]]
        out["amp_step"] = last_step
        out[f"{stat}_first"] = first
        out[f"{stat}_last"] = last
        out[f"{stat}_ratio_all"] = last / first if first else float("inf")
        if deep is not None and deep[0] in amps and deep[-1] in amps:
            a, b = amps[deep[0]], amps[deep[-1]]
            out[f"{stat}_ratio_deep_stage"] = b / a if a else float("inf")
            out["deep_stage_blocks"] = [deep[0], deep[-1]]
        out[f"{stat}_max_over_layers"] = max(amps.values())
    ls = logit_scales_by_step(records)
    if ls:
        s = ls[max(ls)]
        out["logit_scale_min"], out["logit_scale_max"] = min(s.values()), max(s.values())
    return out


# ----------------------------------------------------------------------------- plots
def plot_amplitude_layers(records, out_png: str, depths=None, title: str = "", max_curves: int = 5) -> Optional[str]:
    """Figure-2 style: mean |x| and max |x| versus block index, curves = training steps, log y."""
    if not amplitudes_by_step(records, "mean_abs"):
        return None
    plt = plt_agg()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, stat in zip(axes, AMP_STATS):
        draw_amplitude_panel(ax, records, stat, depths, max_curves, title=f"{stat}")
    fig.suptitle(title or "Activation amplitude per block over training", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def draw_loss(ax, records, label: str = "train/loss", color=None) -> bool:
    curve = loss_curve(records)
    if not curve:
        return False
    xs = [s for s, _ in curve]
    ys = [v if _finite(v) else float("nan") for _, v in curve]
    (line,) = ax.plot(xs, ys, lw=1.3, label=label, color=color)
    bad = [s for s, v in curve if not _finite(v)]
    if bad:
        top = max([v for v in ys if _finite(v)] or [1.0])
        ax.plot(bad, [top] * len(bad), "x", color=line.get_color(), ms=6,
                label=f"{label}: non-finite ({len(bad)} logged)")
    return True


def plot_loss(records, out_png: str, title: str = "") -> Optional[str]:
    if not loss_curve(records):
        return None
    plt = plt_agg()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    draw_loss(ax, records)
    val = loss_curve(records, VAL_LOSS)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "s", ms=5, label=VAL_LOSS)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title or "Loss", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


LOGIT_SCALE_LABEL = "attention scale s = exp(clamp(logit_scale, max=ln 100)) = 1/tau\n(mean over heads)"


def draw_logit_scale_panel(ax, records, depths=None, max_curves: int = 5, title: str = "") -> bool:
    by_step = logit_scales_by_step(records)
    if not by_step:
        ax.set_title(title + " (no logit_scale: dot attention)", fontsize=9)
        ax.axis("off")
        return False
    plt = plt_agg()
    steps = pick_steps(list(by_step), max_curves)
    cmap = plt.get_cmap("plasma")
    for n, s in enumerate(steps):
        layers = sorted(by_step[s])
        ax.plot(layers, [by_step[s][i] for i in layers], marker="o", ms=2.5, lw=1.2,
                color=cmap(0.85 * n / max(1, len(steps) - 1)), label=f"step {s}")
    ax.axhline(10.0, color="0.5", ls="--", lw=0.8, label="init (tau=0.1)")
    ax.axhline(100.0, color="r", ls=":", lw=0.8, label="clamp (tau=0.01)")
    ax.set_yscale("log")
    mark_stages(ax, depths)
    ax.set_xlabel("block index")
    ax.set_ylabel(LOGIT_SCALE_LABEL, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
    return True


def plot_logit_scale(records, out_png: str, depths=None, title: str = "") -> Optional[str]:
    if not logit_scales_by_step(records):
        return None
    plt = plt_agg()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    draw_logit_scale_panel(ax, records, depths, title=title or "Learned attention scale per block")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def report(run_dir: str, out_dir: Optional[str] = None) -> Dict[str, Any]:
    """Write the plots and amplitude_summary.json for one run dir; returns {name: path} + summary."""
    run = load_run(run_dir)
    out_dir = out_dir or RunDir(run_dir).amplitude_report
    os.makedirs(out_dir, exist_ok=True)
    recs, depths = run["records"], run["depths"]
    name = os.path.basename(os.path.normpath(run_dir))
    files = {
        "amplitude_layers": plot_amplitude_layers(recs, os.path.join(out_dir, "amplitude_layers.png"), depths,
                                                  title=f"{name}: activation amplitude per block"),
        "loss": plot_loss(recs, os.path.join(out_dir, "loss.png"), title=f"{name}: loss"),
        "logit_scale": plot_logit_scale(recs, os.path.join(out_dir, "logit_scale.png"), depths,
                                        title=f"{name}: learned attention scale per block"),
    }
    summary = summarize_run(recs, depths)
    with open(os.path.join(out_dir, "amplitude_summary.json"), "w") as f:
        json.dump(_json_safe(summary), f, indent=2)
    return {"files": files, "summary": summary, "out_dir": out_dir}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="swinv2-amplitude-report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a swinv2-train run directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/amplitude_report)")
    a = p.parse_args(argv)
    try:
        res = report(a.run_dir, a.out)
    except FileNotFoundError as e:
        print(f"swinv2-amplitude-report: {e}", file=sys.stderr)
        return 2
    s = res["summary"]
    for k, v in res["files"].items():
        print(f"{k:17s} {v or '(nothing logged)'}")
    if "mean_abs_ratio_all" in s:
        line = (f"amplitude (step {s['amp_step']}): mean|x| last/first block {s['mean_abs_ratio_all']:.3g}")
        if "mean_abs_ratio_deep_stage" in s:
            line += f", within deepest stage {s['mean_abs_ratio_deep_stage']:.3g}"
        print(line)
    else:
        print("no amplitudes in metrics.jsonl (train.probe_every=0?)")
    print(f"diverged: {s['diverged']} (non-finite steps {s['nonfinite_steps']}, loss exploded {s['loss_exploded']}); "
          f"failed to train: {s['failed_to_train']}"
          + (f"; final val top-1 {s['final_val_top1']:.2f}%" if s.get("final_val_top1") is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

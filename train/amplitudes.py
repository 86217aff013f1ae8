"""Activation-amplitude probe metrics (per block) and the amplitude-vs-layer plot.

Keys (swinv2_train.rundir): `amplitude/{layer:02d}/{mean_abs|rms|max}` (layer = block index of
swinv2.iter_blocks) and `logit_scale/{layer:02d}` (mean over heads of exp(clamped logit_scale)).
`plot_amplitudes` only needs the records of metrics.jsonl, so report tools can reuse it.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

from .rundir import AMPLITUDE_KEY_RE, amplitude_key, logit_scale_key


def amplitude_metrics(stats: Dict[int, Dict[str, float]], scales: Dict[int, List[float]]) -> Dict[str, float]:
    out = {amplitude_key(i, k): v for i, s in stats.items() for k, v in s.items()}
    for i, heads in scales.items():
        out[logit_scale_key(i)] = sum(heads) / len(heads)
    return out


def amplitudes_by_step(records: Iterable[dict], stat: str = "rms") -> Dict[int, Dict[int, float]]:
    """{step: {layer: value}} from metrics records."""
    out: Dict[int, Dict[int, float]] = {}
    for rec in records:
        for k, v in rec.items():
            m = AMPLITUDE_KEY_RE.match(k)
            if m and m.group(2) == stat:
                out.setdefault(int(rec["step"]), {})[int(m.group(1))] = float(v)
    return out


def pick_steps(steps: Sequence[int], n: int) -> List[int]:
    """Up to n steps evenly spread over `steps`, first and last included."""
    steps = sorted(steps)
    if len(steps) <= n:
        return steps
    idx = sorted({round(i * (len(steps) - 1) / (n - 1)) for i in range(n)})
    return [steps[i] for i in idx]


def stage_ranges(depths: Optional[Sequence[int]]) -> List[range]:
    out, start = [], 0
    for d in depths or []:
        out.append(range(start, start + d))
        start += d
    return out


def plt_agg():
    """matplotlib with the Agg backend; imported here, not at the top: about a second of import
    that only the end-of-run plot and the report scripts need."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def mark_stages(ax, depths) -> None:
    for r in stage_ranges(depths)[1:]:
        ax.axvline(r[0] - 0.5, color="0.6", lw=0.8, ls=":")


def draw_amplitude_panel(ax, records, stat: str, depths=None, max_curves: int = 5, title: str = "") -> bool:
    """Amplitude vs block index on `ax`, one curve per logged step (viridis: early -> late)."""
    by_step = amplitudes_by_step(records, stat)
    if not by_step:
        ax.set_title(title + " (no amplitudes logged)", fontsize=9)
        return False
    plt = plt_agg()
    steps = pick_steps(list(by_step), max_curves)
    cmap = plt.get_cmap("viridis")
    for n, s in enumerate(steps):
        layers = sorted(by_step[s])
        ys = [by_step[s][i] if math.isfinite(by_step[s][i]) and by_step[s][i] > 0 else float("nan") for i in layers]
        ax.plot(layers, ys, marker="o", ms=2.5, lw=1.2, color=cmap(n / max(1, len(steps) - 1)),
                label=f"step {s}")
    ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # blocks are whole
    mark_stages(ax, depths)
    ax.set_xlabel("block index (dotted: stage boundary)")
    ax.set_ylabel({"mean_abs": "mean |x| of block output", "max": "max |x| of block output",
                   "rms": "RMS of block output"}[stat])
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
    return True


def _amplitude_fig(records, stat: str, max_curves: int, title: Optional[str], depths):
    """The figure of `plot_amplitudes` (None when there is nothing to plot); the caller closes it."""
    if not amplitudes_by_step(records, stat):
        return None
    plt = plt_agg()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_amplitude_panel(ax, records, stat, depths, max_curves,
                         title=title or f"Activation amplitude per block ({stat})")
    fig.tight_layout()
    return fig


def plot_amplitudes(records: Iterable[dict], out_png: str, stat: str = "rms", max_curves: int = 6,
                    title: Optional[str] = None, depths: Optional[Sequence[int]] = None) -> Optional[str]:
    """Amplitude vs layer index (log y), one curve per logged step (up to `max_curves`, evenly
    spread, first and last included). Returns the path, or None when there is nothing to plot."""
    fig = _amplitude_fig(list(records), stat, max_curves, title, depths)
    if fig is None:
        return None
    fig.savefig(out_png, dpi=110)
    plt_agg().close(fig)
    return out_png


def amplitude_figure(records: Iterable[dict], stat: str = "rms", max_curves: int = 6, title: Optional[str] = None,
                     depths: Optional[Sequence[int]] = None):
    """The same figure as an (H, W, 3) uint8 array, for the loggers' images (W&B, TensorBoard);
    None when nothing was probed yet."""
    import numpy as np

    fig = _amplitude_fig(list(records), stat, max_curves, title, depths)
    if fig is None:
        return None
    fig.set_dpi(80)
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt_agg().close(fig)
    return picture

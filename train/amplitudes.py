"""Activation-amplitude metrics (per block) and the amplitude-vs-layer plot.

Keys: `amp/{layer:02d}/{mean_abs|rms|max}` (layer = block index of swinv2.iter_blocks) and
`logit_scale/{layer:02d}` (mean over heads of exp(clamped logit_scale)). `plot_amplitudes`
only needs the records of metrics.jsonl, so report tools can reuse it.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional

_AMP_RE = re.compile(r"^amp/(\d+)/(mean_abs|rms|max)$")


def amplitude_metrics(stats: Dict[int, Dict[str, float]], scales: Dict[int, List[float]]) -> Dict[str, float]:
    out = {f"amp/{i:02d}/{k}": v for i, s in stats.items() for k, v in s.items()}
    for i, heads in scales.items():
        out[f"logit_scale/{i:02d}"] = sum(heads) / len(heads)
    return out


def amplitudes_by_step(records: Iterable[dict], stat: str = "rms") -> Dict[int, Dict[int, float]]:
    """{step: {layer: value}} from metrics records."""
    out: Dict[int, Dict[int, float]] = {}
    for rec in records:
        for k, v in rec.items():
            m = _AMP_RE.match(k)
            if m and m.group(2) == stat:
                out.setdefault(int(rec["step"]), {})[int(m.group(1))] = float(v)
    return out


def plot_amplitudes(records: Iterable[dict], out_png: str, stat: str = "rms", max_curves: int = 6,
                    title: Optional[str] = None) -> Optional[str]:
    """Amplitude vs layer index (log y), one curve per logged step (up to `max_curves`, evenly
    spread, first and last included). Returns the path, or None when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    by_step = amplitudes_by_step(records, stat)
    if not by_step:
        return None
    steps = sorted(by_step)
    if len(steps) > max_curves:
        idx = sorted({round(i * (len(steps) - 1) / (max_curves - 1)) for i in range(max_curves)})
        steps = [steps[i] for i in idx]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    for n, s in enumerate(steps):
        layers = sorted(by_step[s])
        ax.plot(layers, [by_step[s][i] for i in layers], marker="o", ms=3,
                color=cmap(n / max(1, len(steps) - 1)), label=f"step {s}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # blocks are whole
    ax.set_xlabel("block index")
    ax.set_ylabel(f"activation {stat} (block output)")
    ax.set_title(title or f"Activation amplitude per block ({stat})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

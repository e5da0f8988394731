"""Plots for run folders (PNG, matplotlib's Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_lines(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
               *, xlabel: str, ylabel: str, title: str, logy: bool = False) -> None:
    """One chart, one line per series (label -> (xs, ys)), saved atomically enough: the
    PNG is written to a temp name and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=label, marker="." if len(xs) < 40 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1 or any(series):
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)

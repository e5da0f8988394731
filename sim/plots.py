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


def plot_bars(path: str | Path, values: Mapping[str, float], *, ylabel: str, title: str,
              logy: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color=[f"C{i}" for i in range(len(names))])
    ax.bar_label(bars, fmt="%.3g")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def mean_curve(rows: list[dict], x: str) -> tuple[list[float], list[float]]:
    """Mean validation loss over evaluated peers at each step (x = 'step' or 'time')."""
    by_step: dict[int, list[dict]] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r)
    steps = sorted(by_step)
    xs = [max(r[x] for r in by_step[s]) for s in steps]
    ys = [sum(r["val_loss"] for r in by_step[s]) / len(by_step[s]) for s in steps]
    return xs, ys


def write_all(out: Path, results: list, scenario: str) -> None:
    """The four charts of a simulation run folder."""
    plot_lines(out / "loss_vs_time.png", {r.algo: mean_curve(r.rows, "time") for r in results},
               xlabel="virtual time (s)", ylabel="validation loss (nats)",
               title=f"loss vs virtual time — {scenario}")
    plot_lines(out / "loss_vs_step.png", {r.algo: mean_curve(r.rows, "step") for r in results},
               xlabel="local step", ylabel="validation loss (nats)",
               title=f"loss vs step — {scenario}")
    plot_bars(out / "bytes_per_peer.png",
              {r.algo: r.summary["bytes_sent_per_peer"]["mean"] for r in results},
              ylabel="bytes sent per peer (mean)", title=f"traffic — {scenario}", logy=True)
    plot_bars(out / "idle_fraction.png", {r.algo: r.summary["idle_fraction"] for r in results},
              ylabel="fraction of time waiting", title=f"idle fraction — {scenario}")

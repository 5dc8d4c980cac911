"""PNG training curves drawn from the metrics.jsonl of one or several runs (e.g. GRPO vs BPPO).

:func:`plot_runs` reads each run (a run directory holding metrics.jsonl, or a metrics.jsonl file) with
:func:`megatron_bppo.metrics.read_metrics` and writes to its output directory:

    accuracy.png            training accuracy (solid) and held-out eval accuracy (dashed, markers) vs step
    response_length.png     mean response length (tokens), training and eval, vs step
    time_per_step.png       seconds per step vs step
    wall_time.png           cumulative wall time (minutes) vs step
    accuracy_vs_time.png    accuracy (eval where logged, else training) vs cumulative wall time
    summary.png             the five panels above in one figure

A figure whose metric no run has is skipped (and named on stderr). Cumulative wall time
(:func:`cumulative_minutes`) sums ``time/step`` (a record without it, e.g. an eval logged before the first step,
sits at the time so far); runs without any ``time/step`` fall back to timestamp differences (which include any
time a resumed run was down). Records of one step are merged (a training and an eval record), so log the eval of
step s with step s. Metric names follow megatron_bppo.metrics.METRIC_ALIASES. Uses matplotlib's Agg backend (no
display needed); matplotlib is imported inside :func:`plot_runs`. The trainer calls it at the end of a run
(``<run_dir>/plots``); tools/plot_metrics.py is its command line.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .metrics import find_metric, read_metrics

__all__ = ["FIGURES", "cumulative_minutes", "plot_runs"]

FIGURES = ("accuracy", "response_length", "time_per_step", "wall_time", "accuracy_vs_time")


def _series(records: list[dict], name: str, smooth: int = 1) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = find_metric(r, name)
        if v is not None and isinstance(r.get("step"), int):
            xs.append(float(r["step"]))
            ys.append(v)
    if smooth > 1 and ys:
        ys = [sum(ys[max(0, i - smooth + 1):i + 1]) / len(ys[max(0, i - smooth + 1):i + 1]) for i in range(len(ys))]
    return xs, ys


def cumulative_minutes(records: list[dict]) -> tuple[list[float], list[float]]:
    """(steps, cumulative wall minutes at the end of each step)."""
    steps = [r for r in records if isinstance(r.get("step"), int)]
    if any(find_metric(r, "step_time") is not None for r in steps):
        total, xs, ys = 0.0, [], []
        for r in steps:  # a record without time/step (e.g. the eval before training) sits at the time so far
            total += find_metric(r, "step_time") or 0.0
            xs.append(float(r["step"]))
            ys.append(total / 60.0)
        return xs, ys
    stamped = [r for r in steps if isinstance(r.get("timestamp"), (int, float))]
    if len(stamped) < 2:
        return [], []
    t0 = stamped[0]["timestamp"]
    return [float(r["step"]) for r in stamped], [(r["timestamp"] - t0) / 60.0 for r in stamped]


def _at_steps(x_src: list[float], y_src: list[float], steps: list[float]) -> list[Optional[float]]:
    lookup = dict(zip(x_src, y_src))
    return [lookup.get(s) for s in steps]


def _draw(ax, fig_name: str, runs: list[tuple[str, list[dict]]], smooth: int) -> bool:
    """Draw one panel; False when no run has the data."""
    drew = False
    colors = [f"C{i}" for i in range(10)]
    for i, (label, recs) in enumerate(runs):
        c = colors[i % len(colors)]
        if fig_name in ("accuracy", "response_length"):
            train_name, eval_name = ("accuracy", "eval_accuracy") if fig_name == "accuracy" else \
                ("response_length", "eval_response_length")
            x, y = _series(recs, train_name, smooth)
            if x:
                ax.plot(x, y, color=c, label=f"{label} (train)")
                drew = True
            x, y = _series(recs, eval_name)
            if x:
                ax.plot(x, y, color=c, linestyle="--", marker="o", label=f"{label} (eval)")
                drew = True
        elif fig_name == "time_per_step":
            x, y = _series(recs, "step_time", smooth)
            if x:
                ax.plot(x, y, color=c, label=label)
                drew = True
        elif fig_name == "wall_time":
            x, y = cumulative_minutes(recs)
            if x:
                ax.plot(x, y, color=c, label=label)
                drew = True
        elif fig_name == "accuracy_vs_time":
            cx, cy = cumulative_minutes(recs)
            ex, ey = _series(recs, "eval_accuracy")
            src = (ex, ey, "eval") if ex else _series(recs, "accuracy", smooth) + ("train",)
            if cx and src[0]:
                times = _at_steps(cx, cy, src[0])
                pts = [(t, a) for t, a in zip(times, src[1]) if t is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, marker="o" if src[2] == "eval" else None,
                            label=f"{label} ({src[2]})")
                    drew = True
    titles = {"accuracy": ("step", "accuracy"), "response_length": ("step", "mean response length (tokens)"),
              "time_per_step": ("step", "seconds per step"), "wall_time": ("step", "cumulative wall time (min)"),
              "accuracy_vs_time": ("cumulative wall time (min)", "accuracy")}
    ax.set_xlabel(titles[fig_name][0])
    ax.set_ylabel(titles[fig_name][1])
    ax.set_title(fig_name.replace("_", " "))
    ax.grid(alpha=0.3)
    if drew:
        ax.legend(fontsize=8)
    return drew


def plot_runs(runs: Sequence[str | os.PathLike], labels: Optional[Sequence[str]] = None,
              out_dir: str | os.PathLike = ".", *, smooth: int = 1, dpi: int = 100) -> list[Path]:
    """Write the PNGs for ``runs`` into ``out_dir``; returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    loaded = []
    for i, run in enumerate(runs):
        p = Path(run)
        label = labels[i] if labels else (p.name if p.is_dir() else p.parent.name or p.stem)
        loaded.append((label, read_metrics(p)))
    if not any(recs for _, recs in loaded):
        raise ValueError("no metric records in " + ", ".join(map(str, runs)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FIGURES:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        if _draw(ax, name, loaded, smooth):
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=dpi)
            written.append(out / f"{name}.png")
        else:
            print(f"plot_metrics: no data for {name}; skipped", file=sys.stderr)
        plt.close(fig)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, name in zip(axes.flat, FIGURES):
        _draw(ax, name, loaded, smooth)
    axes.flat[-1].axis("off")
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=dpi)
    plt.close(fig)
    written.append(out / "summary.png")
    return written

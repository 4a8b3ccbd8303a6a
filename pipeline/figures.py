"""PNG figures of the report: per-layer transfer MSE, training curves, per-task accuracy bars, probe lines."""
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .comparison import TASK_METRICS  # noqa: E402
from .io import atomic_write  # noqa: E402


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def per_layer_mse(curves: dict[str, pd.DataFrame], path: Path) -> Path:
    """Validation MSE per layer before and after transfer, one line pair per variant (log scale)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, frame in curves.items():
        line, = ax.plot(frame["layer"], frame["mse_after"], marker="o", ms=3, label=f"{name}: after")
        ax.plot(frame["layer"], frame["mse_before"], ls="--", color=line.get_color(), alpha=0.6, label=f"{name}: before")
    ax.set(yscale="log", xlabel="layer", ylabel="validation MSE (per-head outputs)",
           title="Attention transfer: per-layer MSE to the teacher")
    ax.legend(fontsize=7)
    return _save(fig, path)


def loss_curves(curves: dict[str, pd.DataFrame], title: str, ylabel: str, path: Path) -> Path:
    """Train (thin) and validation (markers) loss against updates, one colour per run."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, frame in curves.items():
        train = frame.dropna(subset=["train_loss"])
        val = frame.dropna(subset=["val_loss"])
        if "block" in frame:  # attention transfer: average over blocks at each update
            train = train.groupby("update", as_index=False)["train_loss"].mean()
            val = val.groupby("update", as_index=False)["val_loss"].mean()
        line, = ax.plot(train["update"], train["train_loss"], lw=1, alpha=0.7, label=f"{name}: train")
        ax.plot(val["update"], val["val_loss"], marker="o", color=line.get_color(), label=f"{name}: validation")
    ax.set(xlabel="update", ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def task_bars(table: dict[str, dict[str, dict]], path: Path) -> Path:
    """Each model's score per benchmark with its standard error."""
    tasks = list(TASK_METRICS) + ["avg_zero_shot"]
    models = list(table)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for k, model in enumerate(models):
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, [table[model][t]["value"] for t in tasks], width, yerr=[table[model][t]["stderr"] for t in tasks],
               capsize=2, label=model)
    ax.set_xticks(range(len(tasks)), [f"{t}\n{TASK_METRICS.get(t, 'mean')}" for t in tasks], fontsize=7)
    ax.set(ylabel="accuracy", title="lm-eval scores (error bars: stderr)")
    # below the axes: inside them the legend covered the error bars of the tallest bars
    ax.legend(fontsize=7, ncol=len(models), loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    return _save(fig, path)


def probe_lines(points: dict[str, list[tuple[float, float, float]]], xlabel: str, ylabel: str, path: Path) -> Path:
    """One line per model through (x, value) with stderr bars; x on a log scale (distances, positions)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for model, rows in points.items():
        xs, ys, errors = zip(*rows)
        ax.errorbar(xs, ys, yerr=[0 if math.isnan(e) else e for e in errors], marker="o", ms=3, capsize=2, label=model)
    ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=7)
    return _save(fig, path)

"""Plots of a comparison: MFN against stored parameters, each method's final row, a grid of heatmaps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cramcl.report.plots import _as_array, _save, _viridis_with_grey


def plot_mfn_vs_params(rows: list[dict], path: Path) -> Path:
    """rows: {"method", "MFN", "stored_params"} per method; x on a log scale."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for r in rows:
        if r["MFN"] is None:
            continue
        x = max(1, r["stored_params"])
        std = (r.get("std") or {}).get("MFN")
        ax.errorbar([x], [r["MFN"]], yerr=None if std is None else [std], fmt="o", capsize=3)
        ax.annotate(r["method"], (x, r["MFN"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("stored adapter parameters (log)")
    ax.set_ylabel("MFN (final mean score)")
    ax.set_title("Final score against stored parameters")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_final_rows(tasks: list[str], rows: list[dict], path: Path) -> Path:
    """Grouped bars: per task, each method's score after the last task (+- std over seeds when a row has
    ``final_row_std``)."""
    fig = Figure(figsize=(max(7.0, 1.1 * len(tasks) + 3), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(tasks))
    for j, r in enumerate(rows):
        final = [np.nan if v is None else v for v in r["final_row"]]
        std = r.get("final_row_std")  # over seeds: drawn as error bars
        err = None if std is None else [0.0 if v is None else v for v in std]
        ax.bar(x + j * width - 0.4 + width / 2, final, width, yerr=err, capsize=2 if err else 0, label=r["method"])
    ax.set_xticks(x, labels=tasks, rotation=30, ha="right")
    ax.set_ylabel("score after the last task")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Final row of each method's accuracy matrix")
    return _save(fig, path)


def plot_heatmap_grid(tasks: list[str], matrices: dict[str, list], path: Path) -> Path:
    n = len(matrices)
    cols = min(4, max(1, n))
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 3.0 * rows))
    cmap = _viridis_with_grey()
    for k, (method, scores) in enumerate(matrices.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(_as_array(scores, len(tasks)), cmap=cmap, vmin=0, vmax=100)
        ax.set_title(method, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Accuracy matrices (rows: after task t; columns: task i)")
    return _save(fig, path)

"""Plots of a comparison: MFN against stored parameters, each method's final row, a grid of heatmaps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cramcl.report.plots import _as_array, _save, _viridis_with_grey


#: settings that only size a method: variants differing in these alone are one method at several sizes
SIZE_SETTINGS = ("rank", "alpha")


def size_family(spec: str) -> tuple[str, str]:
    """(the method spec without its size settings, the size settings): ``oracle-lora:rank=4:alpha=8`` ->
    ("oracle-lora", "rank=4:alpha=8")."""
    name, *settings = spec.split(":")
    sizes = [s for s in settings if s.split("=", 1)[0] in SIZE_SETTINGS]
    return ":".join([name, *(s for s in settings if s not in sizes)]), ":".join(sizes)


def plot_mfn_vs_params(rows: list[dict], path: Path, title: str = "Final score against stored parameters") -> Path:
    """rows: {"method", "MFN", "stored_params", "std"?} per method; x on a log scale. Variants of one method that
    differ only in their size settings (rank, alpha) are joined by a line, sorted by size: that method's
    parameter-quality frontier."""
    fig = Figure(figsize=(7, 4.8))
    ax = fig.add_subplot()
    families: dict[str, list[dict]] = {}
    for r in rows:
        if r["MFN"] is not None:
            families.setdefault(size_family(r["method"])[0], []).append(r)
    for family, members in families.items():
        members = sorted(members, key=lambda r: r["stored_params"])
        xs = [max(1, r["stored_params"]) for r in members]
        ys = [r["MFN"] for r in members]
        stds = [(r.get("std") or {}).get("MFN") or 0.0 for r in members]
        joined = len(members) > 1
        line = ax.errorbar(xs, ys, yerr=stds, fmt="o-" if joined else "o", capsize=3, label=family if joined else None)
        for r, x, y in zip(members, xs, ys):
            label = (size_family(r["method"])[1] or "default size").replace(":alpha=", ",a") if joined else r["method"]
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=line[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("stored adapter parameters (log)")
    ax.set_ylabel("MFN (final mean score)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(len(m) > 1 for m in families.values()):
        ax.legend(fontsize=8, loc="lower right")
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

"""Plots of the accuracy matrix (PNG files).

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``) rather than
through pyplot, so the library never changes the user's global backend nor leaks open figures.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

Matrix = Sequence[Sequence[float | None]]


def _as_array(scores: Matrix, n: int) -> np.ma.MaskedArray:
    """n x n masked array; None / NaN / missing rows are masked."""
    arr = np.full((n, n), np.nan)
    for t, row in enumerate(scores[:n]):
        for i, v in enumerate(row[:n]):
            if v is not None:
                arr[t, i] = float(v)
    return np.ma.masked_invalid(arr)


def _save(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_matrix_heatmap(tasks: Sequence[str], scores: Matrix, path: Path | str,
                        title: str = "Accuracy matrix") -> Path:
    """Heatmap of ``scores[t][i]`` (rows: after training task t; columns: task i evaluated), each cell
    annotated with its value (1 decimal); unevaluated cells are grey and blank. Returns ``path``."""
    n = len(tasks)
    data = _as_array(scores, n)
    size = max(4.0, 0.9 * n + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    cmap = _viridis_with_grey()
    top = max(100.0, float(data.max()) if data.count() else 100.0)  # caption scores may exceed 100
    im = ax.imshow(data, cmap=cmap, norm=Normalize(vmin=0.0, vmax=top), aspect="equal")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="score")
    mask = np.ma.getmaskarray(data)
    for t in range(n):
        for i in range(n):
            if not mask[t, i]:
                v = float(data[t, i])
                # dark text on the bright (high) end of viridis, light text elsewhere
                ax.text(i, t, f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if v > 0.6 * top else "white")
    ax.set_xticks(range(n), labels=list(tasks), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=[f"after {t}: {name}" for t, name in enumerate(tasks)])
    ax.set_xlabel("evaluated task i")
    ax.set_ylabel("after training task t")
    ax.set_title(title)
    return _save(fig, path)


def _viridis_with_grey():
    return colormaps["viridis"].with_extremes(bad="lightgrey")  # masked = unevaluated cells


def plot_task_curves(tasks: Sequence[str], scores: Matrix, path: Path | str,
                     title: str = "Scores along the stream") -> Path:
    """One line per task i: its score after each training step t >= i (x: after task t). Unevaluated
    cells are left out of the line. Returns ``path``."""
    n = len(tasks)
    fig = Figure(figsize=(max(5.0, 0.8 * n + 3.0), 4.0))
    ax = fig.add_subplot()
    for i, name in enumerate(tasks):
        xs, ys = [], []
        for t in range(i, min(n, len(scores))):
            v = scores[t][i]
            if v is not None and not math.isnan(float(v)):
                xs.append(t)
                ys.append(float(v))
        if xs:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xticks(range(n), labels=[f"{t}: {name}" for t, name in enumerate(tasks)],
                  rotation=45, ha="right")
    ax.set_xlim(-0.3, max(0, n - 1) + 0.3)
    ax.set_xlabel("after training task t")
    ax.set_ylabel("score")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="best")
    ax.set_title(title)
    return _save(fig, path)

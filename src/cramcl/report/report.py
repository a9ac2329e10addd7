"""``report.md`` of a run and the text formats of ``cramcl metrics``.

Inputs follow the run-directory layouts (docs/run-directory.md):
- matrix: ``{"method": str, "tasks": [name, ...], "scores": [[float|null, ...], ...], "scorers": {task: scorer}}``
- metrics: ``{"MFT", "MFN", "MAA", "BWT", "forgetting": float|null, "params": {"trainable_per_task": [int],
  "stored_total": int, "active_per_sample": int}, "time_s": {...}}``
Missing keys and null / NaN values are shown as "–" (markdown) or left empty (CSV), never guessed.
"""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cramcl.errors import BadInputError
from cramcl.eval.metrics import METRIC_NAMES, json_safe
from cramcl.report.plots import plot_matrix_heatmap, plot_task_curves

DASH = "–"
FORMATS = ("md", "json", "csv")
CSV_COLUMNS = (*METRIC_NAMES, "trainable_total", "stored_total", "active_per_sample")


# ---------------------------------------------------------------- small formatters
def _num(v: Any) -> float | None:
    """A finite float, or None for missing / null / NaN / non-numbers."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _fmt(v: Any, decimals: int) -> str:
    x = _num(v)
    return DASH if x is None else f"{x:.{decimals}f}"


def _fmt_int(v: Any) -> str:
    x = _num(v)
    return DASH if x is None else f"{int(x):,}"


def _cell_text(text: Any) -> str:
    """Markdown-table-safe text (a '|' would split the cell)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise BadInputError(f"unknown format '{fmt}' (known: {', '.join(FORMATS)})")


def _params(metrics: Mapping) -> tuple[list, Any, Any, Any]:
    """(trainable_per_task, trainable_total, stored_total, active_per_sample) from a metrics dict."""
    params = metrics.get("params") or {}
    per_task = list(params.get("trainable_per_task") or [])
    total = sum(int(x) for x in per_task) if per_task else None
    return per_task, total, params.get("stored_total"), params.get("active_per_sample")


# ---------------------------------------------------------------- matrix
def format_matrix(matrix: Mapping, fmt: str = "md") -> str:
    """The accuracy matrix as text. md: rows "after t: task", one column per task (scores with 1
    decimal, "–" for unevaluated); json: pretty JSON; csv: header "after,<tasks...>" and one row per t."""
    _check_fmt(fmt)
    tasks = list(matrix.get("tasks", []))
    scores = list(matrix.get("scores", []))
    if fmt == "json":
        return json.dumps(json_safe(dict(matrix)), indent=2)
    if fmt == "csv":
        lines = [",".join(["after", *(_csv_text(t) for t in tasks)])]
        for t, row in enumerate(scores):
            vals = ["" if _num(v) is None else repr(float(v)) for v in row]
            lines.append(",".join([_csv_text(tasks[t] if t < len(tasks) else t), *vals]))
        return "\n".join(lines)
    header = ["after \\ task", *(_cell_text(t) for t in tasks)]
    rows = []
    for t, row in enumerate(scores):
        label = f"{t}: {_cell_text(tasks[t])}" if t < len(tasks) else str(t)
        rows.append([label, *(_fmt(v, 1) for v in row)])
    scorers = matrix.get("scorers") or {}
    if scorers:
        rows.append(["*scorer*", *(_cell_text(scorers.get(t, DASH)) for t in tasks)])
    return _md_table(header, rows)


def _csv_text(v: Any) -> str:
    s = str(v)
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n') else s


# ---------------------------------------------------------------- metrics
def format_metrics(metrics_json: Mapping, fmt: str = "md") -> str:
    """Metrics as text for ``cramcl metrics``. md: a two-column table (metrics with 2 decimals, parameter
    counts, times); json: pretty JSON (NaN -> null); csv: the header
    ``MFT,MFN,MAA,BWT,forgetting,trainable_total,stored_total,active_per_sample`` and one row
    (empty where unknown). ``trainable_total`` is the sum of ``params.trainable_per_task``."""
    _check_fmt(fmt)
    if fmt == "json":
        return json.dumps(json_safe(dict(metrics_json)), indent=2)
    per_task, total, stored, active = _params(metrics_json)
    if fmt == "csv":
        values = [metrics_json.get(k) for k in METRIC_NAMES] + [total, stored, active]
        row = ["" if _num(v) is None else (str(int(v)) if isinstance(v, numbers.Integral) else repr(float(v)))
               for v in values]
        return ",".join(CSV_COLUMNS) + "\n" + ",".join(row)
    rows = [[k, _fmt(metrics_json.get(k), 2)] for k in METRIC_NAMES]
    rows.append(["params trainable per task",
                 ", ".join(_fmt_int(x) for x in per_task) if per_task else DASH])
    rows.append(["params trainable total", _fmt_int(total)])
    rows.append(["params stored total", _fmt_int(stored)])
    rows.append(["params active per sample", _fmt_int(active)])
    for key, v in (metrics_json.get("time_s") or {}).items():
        rows.append([f"time {_cell_text(key)} (s)", _fmt_value(v)])
    # anything else a runner adds (e.g. "complete", "uses_task_id_at_eval") is shown as given; a method's own
    # analysis has its own sections in the report
    for key, v in metrics_json.items():
        if key not in (*METRIC_NAMES, "params", "time_s", "method_analysis"):
            rows.append([_cell_text(key), _fmt_value(v)])
    return _md_table(["metric", "value"], rows)


def _fmt_value(v: Any) -> str:
    """Markdown text of a number (1 decimal), a list of numbers, or anything else (as JSON)."""
    if isinstance(v, (list, tuple)) and v and all(_num(x) is not None for x in v):
        return ", ".join(_fmt(x, 1) for x in v)
    if _num(v) is not None:
        return _fmt(v, 1)
    return _cell_text(json.dumps(json_safe(v)))


# ---------------------------------------------------------------- report.md
def write_report(run_dir: Path | str, matrix: Mapping, metrics: Mapping,
                 extra_sections: Sequence[tuple[str, str]] = ()) -> Path:
    """Write ``run_dir/report.md`` with ``run_dir/matrix.png`` and ``run_dir/curves.png``.

    Sections: title (method name), accuracy matrix table, continual metrics table, the two plots (linked
    by relative path), then each ``(heading, markdown body)`` of ``extra_sections`` in order, so a method
    can explain itself (routing, ranks, ...). Returns the path of report.md.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    method = str(matrix.get("method", "run"))
    tasks = [str(t) for t in matrix.get("tasks", [])]
    scores = matrix.get("scores", [])
    plot_matrix_heatmap(tasks, scores, run_dir / "matrix.png", title=f"{method}: accuracy matrix")
    plot_task_curves(tasks, scores, run_dir / "curves.png", title=f"{method}: scores along the stream")

    parts = [
        f"# {method}",
        f"Stream of {len(tasks)} tasks: {', '.join(tasks) if tasks else DASH}.",
        "## Accuracy matrix",
        "Score (0-100) on each task (columns) after training through task t (rows); "
        f"{DASH} = not evaluated.",
        format_matrix(matrix, "md"),
        "## Continual metrics",
        format_metrics(metrics, "md"),
        "## Plots",
        "![accuracy matrix](matrix.png)",
        "![scores along the stream](curves.png)",
    ]
    for heading, body in extra_sections:
        parts += [f"## {heading}", body.strip()]
    path = run_dir / "report.md"
    # write-then-rename so an interrupted write never leaves a truncated report
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path

"""report.md, its plots and the text formats of `cramcl metrics`."""
import json

import pytest

from cramcl.errors import BadInputError
from cramcl.report.plots import plot_matrix_heatmap, plot_task_curves
from cramcl.report.report import format_matrix, format_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

MATRIX = {"method": "cram", "tasks": ["shape", "color", "count"],
          "scores": [[80.0, None, None], [75.25, 90.0, None], [70.0, 85.5, 95.0]],
          "scorers": {"shape": "exact", "color": "exact", "count": "number"}}
METRICS = {"MFT": 88.33333, "MFN": 83.5, "MAA": 83.125, "BWT": -7.25, "forgetting": 7.25,
           "params": {"trainable_per_task": [1000, 2500, 500], "stored_total": 4000,
                      "active_per_sample": 1500},
           "time_s": {"train": 12.34, "eval_per_task": [1.0, 2.25]}, "complete": False}


def test_write_report(tmp_path):
    path = write_report(tmp_path / "run", MATRIX, METRICS,
                        extra_sections=[("Routing", "Task *count* reused expert 0.")])
    assert path == tmp_path / "run" / "report.md"
    for name in ("matrix.png", "curves.png"):
        data = (tmp_path / "run" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    md = path.read_text(encoding="utf-8")
    assert md.startswith("# cram\n")
    assert "| 1: color | 75.2 | 90.0 | – |" in md  # 75.25 -> 1 decimal (round half even), None -> –
    assert "| 2: count | 70.0 | 85.5 | 95.0 |" in md
    assert "| *scorer* | exact | exact | number |" in md
    assert "| MFT | 88.33 |" in md and "| BWT | -7.25 |" in md
    assert "| params trainable per task | 1,000, 2,500, 500 |" in md
    assert "| params trainable total | 4,000 |" in md
    assert "| params active per sample | 1,500 |" in md
    assert "| time train (s) | 12.3 |" in md and "| time eval_per_task (s) | 1.0, 2.2 |" in md
    assert "| complete | false |" in md
    assert "![accuracy matrix](matrix.png)" in md and "![scores along the stream](curves.png)" in md
    # the extra section comes last
    assert md.rstrip().endswith("## Routing\n\nTask *count* reused expert 0.")
    assert md.index("## Accuracy matrix") < md.index("## Continual metrics") < md.index("## Plots")


def test_report_with_missing_metrics(tmp_path):
    md = write_report(tmp_path, {"method": "zero-shot", "tasks": ["a"], "scores": [[None]]},
                      {"MFT": None, "BWT": float("nan")}).read_text(encoding="utf-8")
    assert "| 0: a | – |" in md
    assert "| MFT | – |" in md and "| BWT | – |" in md and "| params stored total | – |" in md


def test_plots_standalone(tmp_path):
    tasks = MATRIX["tasks"]
    p1 = plot_matrix_heatmap(tasks, MATRIX["scores"], tmp_path / "sub" / "m.png", "t")
    p2 = plot_task_curves(tasks, [[None] * 3] * 3, tmp_path / "c.png", "t")  # nothing evaluated yet
    assert p1.read_bytes().startswith(PNG_MAGIC) and p2.read_bytes().startswith(PNG_MAGIC)


def test_format_metrics_csv_json_md():
    csv = format_metrics(METRICS, "csv")
    assert csv == ("MFT,MFN,MAA,BWT,forgetting,trainable_total,stored_total,active_per_sample\n"
                   "88.33333,83.5,83.125,-7.25,7.25,4000,4000,1500")
    assert format_metrics({"MFT": 1.0, "BWT": None}, "csv").splitlines()[1] == "1.0,,,,,,,"
    js = json.loads(format_metrics({**METRICS, "BWT": float("nan")}, "json"))
    assert js["BWT"] is None and js["params"]["stored_total"] == 4000
    md = format_metrics(METRICS, "md")
    assert md.splitlines()[:3] == ["| metric | value |", "|---|---|", "| MFT | 88.33 |"]
    with pytest.raises(BadInputError, match="unknown format 'xml'"):
        format_metrics(METRICS, "xml")


def test_format_matrix():
    assert format_matrix(MATRIX, "md").splitlines()[:3] == [
        "| after \\ task | shape | color | count |", "|---|---|---|---|", "| 0: shape | 80.0 | – | – |"]
    assert format_matrix(MATRIX, "csv").splitlines() == [
        "after,shape,color,count", "shape,80.0,,", "color,75.25,90.0,", "count,70.0,85.5,95.0"]
    assert json.loads(format_matrix(MATRIX, "json")) == MATRIX


def test_size_variants_of_one_method_are_joined_into_one_frontier_line(tmp_path):
    """oracle-lora at three ranks is one line (sorted by size); an ablation variant of a method is its own point."""
    from cramcl.report import compare_plots

    assert compare_plots.size_family("oracle-lora:rank=4:alpha=8") == ("oracle-lora", "rank=4:alpha=8")
    assert compare_plots.size_family("cram:sigma=1.0:rank=2") == ("cram:sigma=1.0", "rank=2")
    assert compare_plots.size_family("mtl") == ("mtl", "")
    drawn = []
    real = compare_plots.Figure

    class Recording(real):
        def add_subplot(self, *a, **k):
            ax = super().add_subplot(*a, **k)
            original = ax.errorbar
            ax.errorbar = lambda xs, ys, **kw: drawn.append((list(xs), list(ys), kw.get("label"))) or original(xs, ys, **kw)
            return ax

    compare_plots.Figure = Recording
    try:
        rows = [{"method": "oracle-lora", "MFN": 89.0, "stored_params": 400, "std": {"MFN": 0.2}},
                {"method": "oracle-lora:rank=1:alpha=2", "MFN": 80.0, "stored_params": 50},
                {"method": "oracle-lora:rank=4:alpha=8", "MFN": 86.0, "stored_params": 200},
                {"method": "cram:sigma=1.0", "MFN": 88.0, "stored_params": 300}]
        assert compare_plots.plot_mfn_vs_params(rows, tmp_path / "f.png").stat().st_size > 0
    finally:
        compare_plots.Figure = real
    assert ([50, 200, 400], [80.0, 86.0, 89.0], "oracle-lora") in drawn
    assert ([300], [88.0], None) in drawn

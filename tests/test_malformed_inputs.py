"""Malformed inputs kept under tests/malformed/: each is refused with exit 2 and a message naming the
problem (and the cell, for matrices), never a traceback and never a silently wrong number."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

MALFORMED = Path(__file__).parent / "malformed"

# file -> words the one-line message must contain
MATRICES = {
    "ragged.json": "scores[1] has 1 cells",
    "one_dimensional.json": "scores[0] is not a row",
    "string_cell.json": "scores[1][0] = '60' is not a number",
    "nan_cell.json": "scores[0][0] = nan is not a score in 0-100",
    "infinite_cell.json": "scores[0][0] = inf is not a score in 0-100",
    "huge_cell.json": "scores[0][0] = 1e+308 is not a score in 0-100",
    "boolean_cell.json": "scores[0][0] = True is not a number",
    "negative_cell.json": "scores[0][0] = -1 is not a score in 0-100",
    "above_100.json": "scores[0][0] = 100.5 is not a score in 0-100",
    "too_many_rows.json": "3 rows but 1 tasks",
    "empty_scores.json": "'scores' must be a non-empty list",
    "not_an_object.json": "not a matrix.json",
    "no_scores.json": "not a matrix.json",
    "task_names_mismatch.json": "'tasks' must list 2 task names",
    "nested_cell.json": "scores[0][0] = [50] is not a number",
    "not_utf8.json": "not UTF-8",
    "deeply_nested.json": "nested too deeply",
}


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_metrics_refuses_a_malformed_matrix(name, capsys):
    from cramcl.cli import main

    path = MALFORMED / "matrices" / name
    before = path.read_bytes()
    assert main(["metrics", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cramcl: error: {path}") and MATRICES[name] in err, err
    assert "Traceback" not in err and path.read_bytes() == before


def test_every_malformed_matrix_file_is_covered():
    assert {p.name for p in (MALFORMED / "matrices").iterdir()} == set(MATRICES)


def test_a_records_file_nested_too_deeply_is_bad_input(tmp_path):
    from cramcl.data.records import read_records

    f = tmp_path / "train.json"
    f.write_text("[" * 100000 + "]" * 100000)
    records, problems = read_records(f, tmp_path)
    assert records == [] and problems == [f"{f}: invalid JSON: nested too deeply to be a records file"]
    f2 = tmp_path / "train.jsonl"
    f2.write_text('{"id": "a"}\n' + '{"x": ' * 100000 + "1" + "}" * 100000 + "\n")
    _, problems = read_records(f2, tmp_path)
    assert f"{f2}: line 2: invalid JSON: nested too deeply" in problems


def test_a_good_matrix_still_reads(tmp_path):
    from cramcl.eval.matrix_io import read_matrix

    f = tmp_path / "m.json"
    f.write_text(json.dumps({"tasks": ["a", "b"], "scores": [[50, None], [40.5, 100]]}))
    assert read_matrix(f)["scores"] == [[50, None], [40.5, 100]]

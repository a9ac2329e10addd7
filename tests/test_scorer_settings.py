"""Scorers named in a benchmark YAML: the plain name, a mapping with settings, what validate prints,
references the scorer cannot read, and the settings reaching the scorer at evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cramcl.cli import main
from cramcl.data.benchmark import load_benchmark
from cramcl.data.records import Record
from cramcl.errors import BadInputError
from cramcl.eval.evaluate import score_records


def _bench(root: Path, scorer_t2: str, answer_t2="B", question_t2="Pick.\nA. cat\nB. dog") -> Path:
    Image.new("RGB", (8, 8)).save(root / "a.png")
    line = {"id": "r1", "image": "a.png", "question": "What?", "answer": "cat"}
    (root / "t1.jsonl").write_text(json.dumps(line) + "\n")
    (root / "t2.jsonl").write_text(json.dumps({**line, "question": question_t2, "answer": answer_t2}) + "\n")
    path = root / "bench.yaml"
    path.write_text("name: s\ntasks:\n"
                    "  - {name: t1, train: t1.jsonl, test: t1.jsonl, scorer: exact}\n"
                    f"  - {{name: t2, train: t1.jsonl, test: t2.jsonl, scorer: {scorer_t2}}}\n")
    return path


def test_plain_and_mapping_forms(tmp_path):
    b = load_benchmark(_bench(tmp_path, "{name: anls, threshold: 0.3}"))
    assert [(t.scorer, dict(t.scorer_params), t.scorer_label) for t in b.tasks] == [
        ("exact", {}, "exact"), ("anls", {"threshold": 0.3}, "anls(threshold=0.3)")]
    b = load_benchmark(_bench(tmp_path, "anls"))
    assert b.tasks[1].scorer_label == "anls(threshold=0.5)"  # the default, shown


def test_validate_prints_each_tasks_scorer(tmp_path, capsys):
    assert main(["validate", "--benchmark", str(_bench(tmp_path, "{name: anls, threshold: 0}"))]) == 0
    out = capsys.readouterr().out
    assert "t1           scorer=exact" in out and "t2           scorer=anls(threshold=0)" in out


def test_bad_setting_is_one_line_naming_the_task(tmp_path):
    path = _bench(tmp_path, "{name: anls, treshold: 0.3}")
    with pytest.raises(BadInputError) as info:
        load_benchmark(path)
    assert info.value.problems == [
        f"{path}: task 't2': scorer 'anls': unknown setting 'treshold' (did you mean 'threshold'?)"]


def test_choice_reference_without_a_letter_is_caught_before_training(tmp_path):
    path = _bench(tmp_path, "choice", answer_t2="a cow", question_t2="What animal?")
    with pytest.raises(BadInputError) as info:
        load_benchmark(path)
    assert info.value.problems == [
        f"{tmp_path / 't2.jsonl'}: record id 'r1': scorer 'choice': reference 'a cow' names no option letter"]
    load_benchmark(_bench(tmp_path, "choice", answer_t2="dog"))  # option text, mapped through the question


def test_settings_and_questions_reach_the_scorer():
    rec = Record("r", Path("x.png"), "Pick.\nA. cat\nB. dog", "B")
    assert score_records("choice", [rec], ["dog"])[0] == 100.0  # the question's options map "dog" to B
    rec = Record("r", Path("x.png"), "Q?", "cats")
    assert score_records("anls", [rec], ["cat"], {"threshold": 0.8})[0] == 0.0
    assert score_records("anls", [rec], ["cat"], {"threshold": 0.7})[0] == 75.0
    # vqa_soft sees every listed answer, repeats included: 2 of 10 -> 60
    rec = Record("r", Path("x.png"), "Q?", "two", ("two", "two") + ("three",) * 8)
    assert score_records("vqa_soft", [rec], ["2"])[0] == pytest.approx(60.0)

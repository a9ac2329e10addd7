"""Benchmark and records loading: every bad-input case yields one line naming file, record and reason."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from cramcl.data.benchmark import load_benchmark
from cramcl.data.records import Record, read_records
from cramcl.data.validate import validate_benchmark
from cramcl.errors import BadInputError
from cramcl.eval.scorers import SCORER_NAMES


def png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def llava(rid, image, question, answer) -> dict:
    rec = {"image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                             {"from": "gpt", "value": answer}]}
    return rec if rid is None else {"id": rid, **rec}


def write_json(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def bench(tmp_path: Path):
    """A good two-task benchmark: LLaVA JSON train and JSONL test files, three images."""
    for name in ("a", "b", "c"):
        png(tmp_path / "images" / f"{name}.png")
    write_json(tmp_path / "t1" / "train.json",
               [llava("x1", "a.png", "What is it?", "red"), llava("x2", "b.png", "What is it?", "blue")])
    write_jsonl(tmp_path / "t1" / "test.jsonl", [{"id": "y1", "image": "c.png", "question": "Q?",
                                                  "answer": "red"}])
    write_json(tmp_path / "t2" / "train.json", [llava("z1", "a.png", "How many?", "2")])
    write_jsonl(tmp_path / "t2" / "test.jsonl", [{"id": "w1", "image": "b.png", "question": "N?",
                                                  "answer": "3"}])
    return write_yaml(tmp_path / "bench.yaml", """\
name: tiny
image_root: images
tasks:
  - {name: t1, train: t1/train.json, test: t1/test.jsonl, scorer: exact}
  - {name: t2, train: t2/train.json, test: t2/test.jsonl, scorer: number}
""")


def problems_of(path, **kw) -> list[str]:
    with pytest.raises(BadInputError) as info:
        load_benchmark(path, **kw)
    return info.value.problems


def test_good_benchmark_loads(bench: Path, tmp_path: Path):
    b = load_benchmark(bench)
    assert b.name == "tiny" and b.task_names() == ["t1", "t2"]
    assert b.image_root == (tmp_path / "images").resolve() and b.pretrain_file is None
    t1 = b.tasks[0]
    assert t1.scorer == "exact" and t1.train_file == tmp_path / "t1" / "train.json"
    assert t1.train[0] == Record("x1", (tmp_path / "images" / "a.png").resolve(), "What is it?", "red")
    assert t1.test[0].question == "Q?" and t1.test[0].answers == ()
    assert b.tasks[1].scorer == "number" and [r.id for r in b.tasks[1].test] == ["w1"]


def test_both_formats_in_both_slots(bench: Path, tmp_path: Path):
    write_jsonl(tmp_path / "t1" / "train.json", [{"id": "q", "image": "a.png", "question": "Q?",
                                                  "answer": "yes"}])  # JSONL content, .json name
    write_json(tmp_path / "t1" / "test.jsonl", [llava("l", "b.png", "L?", "no")])
    task = load_benchmark(bench).tasks[0]
    assert (task.train[0].question, task.train[0].answer) == ("Q?", "yes")
    assert (task.test[0].question, task.test[0].answer) == ("L?", "no")


def test_list_answers_missing_ids_and_multiturn(tmp_path: Path):
    png(tmp_path / "a.png")
    f = write_jsonl(tmp_path / "qa.jsonl", [{"image": "a.png", "question": "Q?", "answer": ["two", "2"]}])
    (rec,), problems = read_records(f, tmp_path)
    assert problems == [] and rec.id == "qa-0" and rec.answer == "two" and rec.answers == ("two", "2")
    turns = [{"from": "human", "value": "Say?\n<image>"}, {"from": "gpt", "value": "one"},
             {"from": "human", "value": "More?"}, {"from": "gpt", "value": "two"}]
    f = write_json(tmp_path / "mt.json", [{"id": 7, "image": "a.png", "conversations": turns}])
    (rec,), problems = read_records(f, tmp_path)
    assert problems == [] and (rec.id, rec.question, rec.answer) == ("7", "Say?", "one")


@pytest.mark.parametrize("record, reason", [
    ({"id": "r", "question": "Q?", "answer": "a"}, "missing 'image' field"),
    ({"id": "r", "image": "a.png", "question": "Q?"}, "missing 'answer' field"),
    ({"id": "r", "image": "a.png", "question": "Q?", "answer": "  "}, "empty answer"),
    ({"id": "r", "image": "a.png", "question": "Q?", "answer": []},
     "'answer' list must hold one or more non-empty strings"),
    ({"id": "r", "image": "a.png", "answer": "a"}, "missing 'question' field"),
    ({"id": "r", "image": "gone.png", "question": "Q?", "answer": "a"}, "image 'gone.png' not found"),
    ({"id": "r", "image": "../out.png", "question": "Q?", "answer": "a"},
     "image '../out.png' is outside image_root"),
    (llava("r", "a.png", "Q?", ""), "empty answer"),
    ({"id": "r", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}]},
     "missing answer (no 'gpt' turn after the human turn)"),
    ({"id": "r", "image": "a.png", "conversations": [{"from": "gpt", "value": "a"}]},
     "missing question (no 'human' turn in 'conversations')"),
])
def test_bad_record_gives_one_line_naming_file_and_record(tmp_path: Path, record, reason):
    root = tmp_path / "images"
    png(root / "a.png")
    png(tmp_path / "out.png")  # exists, but outside image_root
    good = {"id": "ok", "image": "a.png", "question": "Q?", "answer": "a"}
    f = write_jsonl(tmp_path / "data.jsonl", [good, record])
    records, problems = read_records(f, root)
    assert [r.id for r in records] == ["ok"]
    assert len(problems) == 1
    assert problems[0].startswith(f"{f}: record 1 (id 'r'): {reason}")


def test_absolute_and_symlink_escapes(tmp_path: Path):
    root = tmp_path / "images"
    png(root / "a.png")
    outside = png(tmp_path / "secret.png")
    os.symlink(outside, root / "link.png")
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "abs", "image": str(outside), "question": "Q?", "answer": "a"},
        {"id": "lnk", "image": "link.png", "question": "Q?", "answer": "a"},
        {"id": "in", "image": str((root / "a.png").resolve()), "question": "Q?", "answer": "a"},
    ])
    records, problems = read_records(f, root)
    assert [r.id for r in records] == ["in"]  # an absolute path inside image_root is fine
    where = f"is outside image_root '{root.resolve()}'"
    assert problems == [f"{f}: record 0 (id 'abs'): image '{outside}' {where}",
                        f"{f}: record 1 (id 'lnk'): image 'link.png' {where}"]


def test_invalid_json_reports_line_numbers(tmp_path: Path):
    png(tmp_path / "a.png")
    f = tmp_path / "d.jsonl"
    f.write_text('{"id": "1", "image": "a.png", "question": "Q?", "answer": "a"}\n\n{"id": "2", oops\n')
    records, problems = read_records(f, tmp_path)
    assert [r.id for r in records] == ["1"]
    assert len(problems) == 1 and problems[0].startswith(f"{f}: line 3: invalid JSON: ")
    g = tmp_path / "d.json"
    g.write_text('[\n {"id": "1",\n  "image": "a.png"\n  "question": "Q?"}\n]\n')
    assert read_records(g, tmp_path)[1][0].startswith(f"{g}: line 4: invalid JSON: ")


def test_duplicate_ids(tmp_path: Path):
    png(tmp_path / "a.png")
    f = write_json(tmp_path / "d.json", [llava("same", "a.png", "Q?", "a")] * 2)
    records, problems = read_records(f, tmp_path)
    assert len(records) == 1
    assert problems == [f"{f}: record 1 (id 'same'): duplicate id 'same' (first used by record 0)"]


def test_corrupt_image_only_found_when_images_are_opened(bench: Path, tmp_path: Path):
    (tmp_path / "images" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    load_benchmark(bench)  # existence check only: passes
    problems = problems_of(bench, check_images=True)
    assert len(problems) == 1
    test_file = tmp_path / "t1" / "test.jsonl"
    assert problems[0].startswith(f"{test_file}: record 0 (id 'y1'): image 'c.png' unreadable")
    bench_obj, found = validate_benchmark(bench)
    assert bench_obj is None and found == problems
    (tmp_path / "images" / "c.png").unlink()
    png(tmp_path / "images" / "c.png")
    bench_obj, found = validate_benchmark(bench)
    assert found == [] and bench_obj.task_names() == ["t1", "t2"]


def test_yaml_level_problems(bench: Path, tmp_path: Path):
    write_yaml(bench, """\
name: tiny
image_root: images
taks: 3
tasks:
  - {name: t1, train: t1/train.json, test: t1/missing.jsonl, scorer: exactly}
  - {name: t1, train: t2/train.json, test: t2/test.jsonl, scorr: exact}
""")
    known = ", ".join(SCORER_NAMES)
    assert problems_of(bench) == [
        f"{bench}: unknown key 'taks' (did you mean 'tasks'?)",
        f"{bench}: task 't1': unknown scorer 'exactly' (known: {known})",
        f"{bench}: task 't1': test file '{tmp_path / 't1' / 'missing.jsonl'}' not found",
        f"{bench}: task 't1': duplicate task name (also task 0)",
        f"{bench}: task 't1': unknown key 'scorr' (did you mean 'scorer'?)",
        f"{bench}: task 't1': missing scorer (known: {known})",
    ]


def test_empty_task_list_and_missing_files(tmp_path: Path):
    (tmp_path / "images").mkdir()
    empty = write_yaml(tmp_path / "e.yaml", "name: e\nimage_root: images\ntasks: []\n")
    assert problems_of(empty) == [f"{empty}: no tasks (the 'tasks' list is missing or empty)"]
    assert problems_of(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: benchmark file not found"]
    bad_root = write_yaml(tmp_path / "r.yaml", "image_root: pics\ntasks: []\n")
    assert problems_of(bad_root)[0].startswith(f"{bad_root}: image_root 'pics' is not a directory")


def test_all_problems_are_reported(bench: Path, tmp_path: Path):
    write_json(tmp_path / "t1" / "train.json", [
        {"id": "a", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "x"}]},
        llava("b", "../../etc/passwd", "Q?", "x"),
        llava("c", "a.png", "Q?", "x")])
    write_jsonl(tmp_path / "t2" / "test.jsonl", [{"id": "w1", "image": "nope.png", "question": "N?",
                                                  "answer": "3"}])
    problems = problems_of(bench)
    t1, t2 = tmp_path / "t1" / "train.json", tmp_path / "t2" / "test.jsonl"
    assert [p.split(": ")[0] + ": " + p.split(": ")[1] for p in problems] == [
        f"{t1}: record 0 (id 'a')", f"{t1}: record 1 (id 'b')", f"{t2}: record 0 (id 'w1')"]


def test_limits_and_pretrain(bench: Path, tmp_path: Path):
    write_jsonl(tmp_path / "pre.jsonl", [{"image": "a.png", "question": "Describe.", "answer": "red"}])
    text = bench.read_text().replace("tasks:", "pretrain: pre.jsonl\ntasks:")
    write_yaml(bench, text)
    b = load_benchmark(bench, max_train=1, max_test=0)
    assert b.pretrain_file == tmp_path / "pre.jsonl"
    assert [len(t.train) for t in b.tasks] == [1, 1] and [len(t.test) for t in b.tasks] == [0, 0]
    write_jsonl(tmp_path / "pre.jsonl", [{"image": "a.png", "question": "Describe."}])
    assert problems_of(bench) == [f"{tmp_path / 'pre.jsonl'}: record 0: missing 'answer' field"]


def test_pretrain_first_is_read_checked_and_needs_pretrain(bench: Path, tmp_path: Path):
    write_jsonl(tmp_path / "pre.jsonl", [{"image": "a.png", "question": "Describe.", "answer": "red"}])
    write_jsonl(tmp_path / "first.jsonl", [{"image": "a.png", "question": "Which option says red ?", "answer": "A"}])
    original = bench.read_text()
    write_yaml(bench, original.replace("tasks:", "pretrain: pre.jsonl\npretrain_first: first.jsonl\ntasks:"))
    assert load_benchmark(bench).pretrain_first_file == tmp_path / "first.jsonl"
    write_jsonl(tmp_path / "first.jsonl", [{"image": "a.png", "answer": "A"}])
    assert problems_of(bench) == [f"{tmp_path / 'first.jsonl'}: record 0: missing 'question' field"]
    write_yaml(bench, original.replace("tasks:", "pretrain_first: pre.jsonl\ntasks:"))
    assert problems_of(bench) == [f"{bench}: 'pretrain_first' needs a 'pretrain' file too (the stage it comes before)"]

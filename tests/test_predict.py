"""cramcl predict: new questions to a finished run, no task id, the evaluation code path."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import LogSink

torch.set_num_threads(1)


def test_predict_answers_as_evaluation_did_without_a_task_id(cram_run, tmp_path, capsys):
    from cramcl.cli import main
    from cramcl.engine.session import open_finished_run

    session, after, _ = open_finished_run(cram_run, log=LogSink())
    rows, lines = {}, []
    for task in session.bench.tasks:
        for r in list(task.test)[:6]:
            rows[r.id] = r
            lines.append(json.dumps({"id": r.id, "image": str(r.image), "question": r.question}))
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    assert main(["predict", "--run", str(cram_run), "--records", str(questions), "--out", str(out)]) == 0
    answers = {a["id"]: a["answer"] for a in map(json.loads, out.read_text().splitlines())}
    evaluated = {}
    for task in session.bench.tasks:
        for line in (cram_run / "results" / "predictions" / f"after_{after}" / f"{task.name}.jsonl").open():
            row = json.loads(line)
            evaluated[row["id"]] = row["prediction"]
    agree = sum(answers[i] == evaluated[i] for i in rows) / len(rows)
    assert agree >= 0.9, agree  # other batches may flip a float near-tie, nothing more


def test_predict_one_image_with_explain_shows_the_routing(cram_run, capsys):
    from cramcl.cli import main
    from cramcl.engine.session import open_finished_run

    session, _, _ = open_finished_run(cram_run, log=LogSink())
    record = session.bench.tasks[-1].test[0]
    capsys.readouterr()
    assert main(["predict", "--run", str(cram_run), "--image", str(record.image), "--question", record.question,
                 "--explain"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["question"] == record.question and isinstance(row["answer"], str)
    assert "cosine to group prototypes" in row["routing"] and "expert" in row["routing"]


@pytest.mark.parametrize("argv, words", [
    (["--image", "nope.png", "--question", "What?"], "--image nope.png: not found"),
    (["--image", "x.png"], "--image and --question go together"),
    ([], "give either --image and --question, or --records"),
    (["--records", "missing.jsonl"], "missing.jsonl: file not found"),
])
def test_predict_bad_input(cram_run, capsys, argv, words):
    from cramcl.cli import main

    assert main(["predict", "--run", str(cram_run), *argv]) == 2
    assert words in capsys.readouterr().err


def test_predict_names_the_bad_line(cram_run, tmp_path, capsys):
    from cramcl.cli import main

    f = tmp_path / "q.jsonl"
    f.write_text('{"image": "a.png"}\n{not json\n')
    assert main(["predict", "--run", str(cram_run), "--records", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f}: line 1: needs string fields 'image' and 'question'" in err and f"{f}: line 2: invalid JSON" in err

"""Malformed inputs kept under tests/malformed/: each is refused with exit 2 and a message naming the
problem (and the cell, for matrices), never a traceback and never a silently wrong number.

Matrices are read by ``cramcl metrics``; records, images, benchmark YAML, settings files, arguments and run
directories by the real ``cramcl run`` / ``validate`` / ``eval`` (through ``cli.main``), each dropped into the
minimal valid benchmark of ``malformed/_valid``. Every refusal comes before a model is built (the backbone
builder is replaced by one that fails the test), ``--out`` is never created, and a run directory given to
``--resume`` / ``eval`` is left byte-identical."""
from __future__ import annotations

import hashlib
import json
import shlex
import shutil
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


# ---------------------------------------------------------------- inputs read by run / validate / eval
VALID = MALFORMED / "_valid"

# records file -> words of its one-line message (after "<file>: "); the file is task 'colour''s train split
RECORDS = {
    "not_json.jsonl": "line 2: invalid JSON: Expecting ',' delimiter",
    "no_question.jsonl": "record 0 (id 'r0'): missing 'question' field",
    "no_answer.jsonl": "record 0 (id 'r0'): missing 'answer' field",
    "no_image.jsonl": "record 0 (id 'r0'): missing 'image' field",
    "answer_is_a_number.jsonl": "record 0 (id 'r0'): 'answer' must be a string or a list of strings, got int",
    "image_outside_root.jsonl": "record 0 (id 'r0'): image '../../outside.png' is outside image_root",
    "image_not_found.jsonl": "record 1 (id 'r1'): image 'green.png' not found",
    "empty.jsonl": "file is empty (no records)",
    "duplicate_ids.jsonl": "record 1 (id 'r0'): duplicate id 'r0' (first used by record 0)",
    "id_is_boolean.jsonl": "record 0 (id 'True'): 'id' must be a string, got bool",
    "image_name_with_nul.jsonl": "record 0 (id 'r0'): image path 'red.png\\x00.png' is not a usable file name (embedded null byte)",
    "image_name_too_long.jsonl": "record 0 (id 'r0'): image path '" + "x" * 60 + "'... (5004 characters) is not a "
                                 "usable file name (File name too long)",
    "line_not_an_object.jsonl": "record 1: expected a JSON object, got str",
    "not_utf8.jsonl": "not UTF-8 (byte 0xe9 at line 2, column",
    "llava_no_answer.json": "record 0 (id 'l0'): missing answer (no 'gpt' turn after the human turn)",
    "llava_trailing_comma.json": "line 3: invalid JSON: Expecting value",
    "llava_empty_list.json": "no records",
}

# image file (referenced by record 'bad' of the train split) -> words naming the problem
IMAGES = {"truncated.png": "Truncated File Read", "zero_bytes.png": "cannot identify image file",
          "text_named_png.png": "cannot identify image file", "bad_checksum.png": "bad header checksum in b'IDAT'"}

# benchmark YAML (next to the valid records and images) -> words of its one-line message
BENCHMARKS = {
    "unknown_key.yaml": "unknown key 'taskz' (did you mean 'tasks'?)",
    "unknown_task_key.yaml": "task 'colour': unknown key 'epochs'",
    "no_tasks.yaml": "no tasks (the 'tasks' list is missing or empty)",
    "duplicate_task_names.yaml": "task 'colour': duplicate task name (also task 0)",
    "unknown_scorer.yaml": "task 'colour': unknown scorer 'exakt'",
    "scorer_missing.yaml": "task 'colour': missing scorer",
    "scorer_setting_out_of_range.yaml": "scorer 'anls': 'threshold' must be a number in [0.0, 1.0) (got 7)",
    "records_file_missing.yaml": "task 'colour': train file",
    "image_root_missing.yaml": "image_root 'pictures' is not a directory",
    "task_name_not_path_safe.yaml": "task 0: 'name' must be a non-empty string of letters, digits",
    "invalid_yaml.yaml": "invalid YAML",
    "not_a_mapping.yaml": "expected a mapping with keys name, image_root, tasks, pretrain",
    "alias_bomb.yaml": "line 7: more than 100,000 values once its aliases are expanded (an alias bomb?)",
    "duplicate_key.yaml": "line 6: duplicate key 'tasks' (first at line 4)",
    "task_name_too_long.yaml": "task 0: 'name' is 300 characters, more than 100 (task names become file names)",
}

# --config file -> words of its one-line message (after "<file>: ")
SETTINGS = {
    "unknown_key.yaml": "train: unknown key 'lr_rate'",
    "out_of_range.yaml": "train.steps_per_task: 0 must be >= 1",
    "wrong_type.yaml": "train.lr: expected a number, got 'fast'",
    "not_a_mapping.yaml": "expected a mapping at the top level",
    "not_utf8.yaml": "not UTF-8 (byte 0xe9",
    "invalid_yaml.yaml": "invalid YAML",
    "unknown_profile.yaml": "profile: unknown profile 'fast'",
    "unknown_method.yaml": "method: unknown method 'nosuchmethod'",
    "lora_rank_zero.yaml": "method.rank: 0 must be >= 1",
    "unknown_scheduler.yaml": "train.scheduler: 'linear' is not one of cosine, constant",
    "duplicate_key.yaml": "line 4: duplicate key 'lr' (first at line 3)",
    "alias_bomb.yaml": "more than 100,000 values once its aliases are expanded",
    "seed_too_large.yaml": "seed: 123456789012345678901 must be <= 2,147,483,647",
    "image_size_huge.yaml": "backbone.image_size: 100000 must be <= 1,024",
}

# run directory given to `run --resume` and `eval` -> words of the message (after "<dir>/<file>: ")
RUN_DIRS = {
    "config_invalid_yaml": ("config.yaml", "not a readable config (ParserError)"),
    "config_not_utf8": ("config.yaml", "not a readable config (UnicodeDecodeError)"),
    "config_not_a_mapping": ("config.yaml", "not a cramcl config (expected a mapping)"),
    "config_unknown_key": ("config.yaml", "unknown key 'trian' (did you mean 'train'?)"),
    "config_out_of_range": ("config.yaml", "train.steps_per_task: -3 must be >= 1"),
    "config_missing": ("config.yaml", "not found"),
    "config_duplicate_key": ("config.yaml", "line 6: duplicate key 'lr' (first at line 5)"),
}

# command line (one line; {out} is the run directory) -> words of the message
ARGUMENTS = {
    "force_without_resume.args": "--force only applies with --resume",
    "resume_without_out.args": "--resume needs --out DIR",
    "seeds_not_numbers.args": "--seeds: 'x' is not a non-negative integer",
    "unknown_task.args": "data.tasks: unknown task 'nosuch'",
    "unknown_method.args": "--method: unknown method 'nosuchmethod'",
    "seeds_superscript.args": "--seeds: '²' is not a non-negative integer",
    "seeds_too_large.args": "--seeds: 123456789012345678901 is too large (a seed is in [0, 2147483647])",
    "seeds_empty.args": "--seeds: give at least one seed",
    "tasks_out_of_order.args": "data.tasks: colour,shape is not in the order of the stream",
    "base_steps_zero.args": "command line: backbone.base_steps: 0 must be >= 1",
    "batch_size_huge.args": "command line: train.batch_size: 1000000 must be <= 4,096",
    "image_size_huge.args": "command line: backbone.image_size: 100000 must be <= 1,024",
}

QUICK_RUN = ["--profile", "quick", "--method", "lora-ft"]


@pytest.fixture
def no_model(monkeypatch):
    """Bad input is refused before any model is built: building one fails the test."""
    import cramcl.backbones

    def refuse(*a, **k):
        pytest.fail("a model was built before the bad input was refused")

    monkeypatch.setattr(cramcl.backbones, "build_backbone", refuse)


def _refused(argv, capsys, *words) -> str:
    """Run the CLI; it must exit 2 with every problem on one 'cramcl: error:' line, one of which holds all
    of ``words``, and no traceback. Returns standard error."""
    from cramcl.cli import main

    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("cramcl: error: ") for line in lines), err
    assert any(all(w in line for w in words) for line in lines), (words, err)
    return err


def _bench(tmp_path: Path) -> Path:
    bench = tmp_path / "bench"
    shutil.copytree(VALID, bench)
    return bench


def _tree(path: Path) -> dict:
    """Every file and folder under ``path`` with its bytes' digest and modification time (a file rewritten
    with the same bytes is touched too); folders by name."""
    return {str(p.relative_to(path)): ((hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                                       if p.is_file() else None)
            for p in sorted(path.rglob("*"))}


def _check_benchmark(bench_yaml: Path, tmp_path: Path, capsys, *words):
    """``validate`` and ``run`` both refuse it; the run's --out is never created."""
    before = _tree(bench_yaml.parent)
    _refused(["validate", "--benchmark", bench_yaml], capsys, *words)
    out = tmp_path / "run"
    _refused(["run", *QUICK_RUN, "--benchmark", bench_yaml, "--out", out], capsys, *words)
    assert not out.exists()
    assert _tree(bench_yaml.parent) == before  # the inputs are only read


def test_the_valid_benchmark_is_valid(capsys):
    from cramcl.cli import main

    assert main(["validate", "--benchmark", str(VALID / "benchmark.yaml")]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_run_and_validate_refuse_a_malformed_records_file(name, tmp_path, capsys, no_model):
    bench = _bench(tmp_path)
    shutil.copy(MALFORMED / "records" / name, bench / name)
    yaml_path = bench / "benchmark.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("train: train.jsonl", f"train: {name}"))
    _check_benchmark(yaml_path, tmp_path, capsys, f"cramcl: error: {bench / name}: {RECORDS[name]}")


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_run_and_validate_refuse_an_image_that_does_not_decode(name, tmp_path, capsys, no_model):
    bench = _bench(tmp_path)
    shutil.copy(MALFORMED / "images" / name, bench / "images" / name)
    with open(bench / "train.jsonl", "a") as f:
        f.write(json.dumps({"id": "bad", "image": name, "question": "What colour is it?", "answer": "green"}) + "\n")
    # validate names the records file and the record; run names the image and the record that uses it
    _refused(["validate", "--benchmark", bench / "benchmark.yaml"], capsys,
             f"{bench / 'train.jsonl'}: record 2 (id 'bad'): image '{name}' unreadable", IMAGES[name])
    out = tmp_path / "run"
    _refused(["run", *QUICK_RUN, "--benchmark", bench / "benchmark.yaml", "--out", out], capsys,
             f"{(bench / 'images' / name).resolve()}: unreadable image", IMAGES[name], "task 'colour' train record 'bad'")
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_run_and_validate_refuse_a_malformed_benchmark_yaml(name, tmp_path, capsys, no_model):
    bench = _bench(tmp_path)
    shutil.copy(MALFORMED / "benchmarks" / name, bench / name)
    _check_benchmark(bench / name, tmp_path, capsys, f"cramcl: error: {bench / name}", BENCHMARKS[name])


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_run_refuses_a_malformed_settings_file(name, tmp_path, capsys, no_model):
    path = MALFORMED / "settings" / name
    before = path.read_bytes()
    out = tmp_path / "run"
    _refused(["run", *QUICK_RUN, "--config", path, "--out", out], capsys,
             f"cramcl: error: {path}: ", SETTINGS[name])
    assert not out.exists() and path.read_bytes() == before


@pytest.mark.parametrize("name", sorted(RUN_DIRS))
def test_resume_and_eval_refuse_a_damaged_run_directory_and_leave_it_untouched(name, tmp_path, capsys, no_model):
    run = tmp_path / "run"
    shutil.copytree(MALFORMED / "run_dirs" / name, run)
    file, words = RUN_DIRS[name]
    before = _tree(run)
    for argv in (["run", "--resume", "--out", run], ["eval", "--run", run]):
        _refused(argv, capsys, f"cramcl: error: {run / file}: ", words)
        assert _tree(run) == before


def test_eval_of_a_run_whose_only_checkpoint_is_damaged_names_it_and_touches_nothing(tmp_path, capsys, no_model):
    run = tmp_path / "run"
    shutil.copytree(MALFORMED / "run_dirs" / "checkpoint_damaged", run)
    before = _tree(run)
    _refused(["eval", "--run", run], capsys, f"{run / 'checkpoints' / 'task_0' / 'method.safetensors'}: 17 bytes, "
             "the manifest says 40960 (truncated", "checkpoint task_0 is damaged", "no earlier checkpoint is usable")
    _refused(["eval", "--run", run, "--after-task", "3"], capsys, f"{run}: no checkpoint for task 3")
    assert _tree(run) == before


@pytest.mark.parametrize("name", sorted(ARGUMENTS))
def test_run_refuses_malformed_arguments(name, tmp_path, capsys, no_model):
    out = tmp_path / "run"
    argv = shlex.split((MALFORMED / "arguments" / name).read_text().format(out=out))
    _refused(argv, capsys, f"cramcl: error: {ARGUMENTS[name]}")
    assert not out.exists()


@pytest.mark.parametrize("kind, table", [("records", RECORDS), ("images", IMAGES), ("benchmarks", BENCHMARKS),
                                         ("settings", SETTINGS), ("run_dirs", RUN_DIRS), ("arguments", ARGUMENTS)])
def test_every_malformed_input_file_is_covered(kind, table):
    names = {p.name for p in (MALFORMED / kind).iterdir()} - {"checkpoint_damaged"}
    assert names == set(table)


def test_at_least_30_malformed_inputs_are_kept():
    kinds = ("matrices", "records", "images", "benchmarks", "settings", "run_dirs", "arguments")
    assert sum(len(list((MALFORMED / k).iterdir())) for k in kinds) >= 30


def test_the_installed_command_exits_2_with_one_line(tmp_path):
    """The same refusals through a real process (`python -m cramcl`): the exit status the shell sees."""
    import os
    import subprocess
    import sys

    bench = _bench(tmp_path)
    shutil.copy(MALFORMED / "records" / "id_is_boolean.jsonl", bench / "train.jsonl")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv, words in ((["run", *QUICK_RUN, "--benchmark", bench / "benchmark.yaml", "--out", out], RECORDS["id_is_boolean.jsonl"]),
                        (["run", *QUICK_RUN, "--config", MALFORMED / "settings" / "not_utf8.yaml", "--out", out], SETTINGS["not_utf8.yaml"])):
        proc = subprocess.run([sys.executable, "-m", "cramcl", *map(str, argv)], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
        assert not out.exists()

"""A benchmark: a YAML file naming a stream of tasks, each with a train and a test records file.

```yaml
name: my-stream
image_root: images          # every image path must stay inside it (default: the YAML's directory)
pretrain: pretrain.jsonl    # optional: caption records for a base stage
pretrain_first: reading.jsonl  # optional: records the base stage trains on alone first (backbone.base_first_*)
tasks:                      # in training order
  - name: shape
    train: shape/train.json
    test: shape/test.jsonl
    scorer: exact           # or with settings: {name: anls, threshold: 0.5}
```

Paths are relative to the YAML file's directory. ``load_benchmark`` reports every problem it finds
(unknown keys with a "did you mean", bad tasks, every bad record of every file) in one
``BadInputError`` so the user fixes them all in one round.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cramcl.data.records import Record, read_records
from cramcl.errors import BadInputError
from cramcl.eval.scorers import check_reference, resolve_scorer, scorer_label
from cramcl.safe_yaml import YAMLRefused, load_yaml

TOP_KEYS = ("name", "image_root", "tasks", "pretrain", "pretrain_first")
TASK_KEYS = ("name", "train", "test", "scorer")
# Task names end up in file names (predictions/after_<t>/<task>.jsonl), so keep them path-safe.
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: a task name becomes a file name with a suffix, and filesystems cap names at 255 bytes; 100 leaves room for
#: any suffix and is far longer than a name one reads in a results table
MAX_TASK_NAME = 100


@dataclass(frozen=True)
class TaskSpec:
    """One task of the stream: its records, scorer (name and settings) and the files they came from."""

    name: str
    train: tuple[Record, ...]
    test: tuple[Record, ...]
    scorer: str
    train_file: Path
    test_file: Path
    scorer_params: tuple[tuple[str, float], ...] = field(default=())  # every setting, defaults filled in

    @property
    def scorer_label(self) -> str:
        """The scorer as shown to users and in matrix.json: ``exact``, ``anls(threshold=0.5)``."""
        return scorer_label(self.scorer, dict(self.scorer_params))


@dataclass(frozen=True)
class Benchmark:
    """A loaded, checked benchmark. ``tasks`` are in training order."""

    name: str
    path: Path
    image_root: Path
    tasks: tuple[TaskSpec, ...]
    pretrain_file: Path | None = None
    pretrain_first_file: Path | None = None  # trained alone before pretrain_file (a curriculum's first stage)

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def _unknown_keys(where: str, mapping: dict, allowed: tuple[str, ...]) -> list[str]:
    problems = []
    for key in mapping:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(allowed)})"
        problems.append(f"{where}: unknown key '{key}'{hint}")
    return problems


_ENV_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def _expand(where: str, key: str, value: str, problems: list[str]) -> str | None:
    """``~`` and ``$VAR`` / ``${VAR}`` expanded (a data root given by a variable); an unset variable is a problem."""
    expanded = os.path.expandvars(os.path.expanduser(value))
    unset = _ENV_VAR.findall(expanded)
    if unset:
        problems.append(f"{where}: '{key}' uses unset environment variable {', '.join(unset)} ({value})")
        return None
    return expanded


def _path_field(where: str, mapping: dict, key: str, base: Path, problems: list[str]) -> Path | None:
    """A required path-valued key, resolved against the YAML's directory (after ``$VAR`` expansion)."""
    value = mapping.get(key)
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}: missing '{key}' (a path relative to the benchmark file)")
        return None
    value = _expand(where, key, value, problems)
    return None if value is None else base / value


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError([f"{path}: benchmark file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError([f"{path}: cannot read: {exc}"]) from None
    try:
        return load_yaml(text)
    except YAMLRefused as exc:
        raise BadInputError([f"{path}: {exc}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        raise BadInputError([f"{path}:{line} invalid YAML: {exc}".replace("\n", " ")]) from None


def _check_task(yaml_path: Path, index: int, raw: Any, seen: dict[str, int]) -> tuple[dict, list[str]]:
    """Check one task entry's keys; return its parsed fields and its problems."""
    where = f"{yaml_path}: task {index}"
    if not isinstance(raw, dict):
        return {}, [f"{where}: expected a mapping with keys {', '.join(TASK_KEYS)}"]
    name = raw.get("name")
    problems: list[str] = []
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        problems.append(f"{where}: 'name' must be a non-empty string of letters, digits, '_', '-', '.'"
                        f" (got {name!r})")
    elif len(name) > MAX_TASK_NAME:
        problems.append(f"{where}: 'name' is {len(name)} characters, more than {MAX_TASK_NAME} (task names become "
                        f"file names): '{name[:40]}...'")
    else:
        where = f"{yaml_path}: task '{name}'"
        if name in seen:
            problems.append(f"{where}: duplicate task name (also task {seen[name]})")
        else:
            seen[name] = index
    problems += _unknown_keys(where, raw, TASK_KEYS)
    base = yaml_path.parent
    train = _path_field(where, raw, "train", base, problems)
    test = _path_field(where, raw, "test", base, problems)
    scorer, params, found = resolve_scorer(raw.get("scorer"))
    problems += [f"{where}: {p}" for p in found]
    return {"name": name, "train": train, "test": test, "scorer": scorer,
            "scorer_params": tuple(params.items())}, problems


def _check_references(test_file: Path, scorer: str, records: tuple[Record, ...]) -> list[str]:
    """Test records whose references the task's scorer cannot read (a choice answer without an option
    letter, a bbox_iou answer that is not a box), one line each."""
    problems = []
    for r in records:
        for why in check_reference(scorer, list(r.answers) or r.answer, r.question):
            problems.append(f"{test_file}: record id '{r.id}': scorer '{scorer}': {why}")
    return problems


def _load_split(
    where: str, slot: str, file: Path | None, image_root: Path | None, check_images: bool,
    limit: int | None, problems: list[str],
) -> tuple[Record, ...]:
    if file is None:
        return ()
    if not file.is_file():
        problems.append(f"{where}: {slot} file '{file}' not found")
        return ()
    if image_root is None:  # already reported; records cannot be checked without it
        return ()
    records, found = read_records(file, image_root, check_images=check_images)
    problems += found
    return tuple(records if limit is None else records[:limit])


def load_benchmark(
    path: str | Path,
    *,
    check_images: bool = False,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Benchmark:
    """Load and check a benchmark YAML and all its records files.

    Image files are always checked to exist (a stat); ``check_images`` also decodes every one.
    ``max_train`` / ``max_test`` keep the first N records of each split (all records are still checked).
    Raises ``BadInputError`` listing every problem found.
    """
    yaml_path = Path(path)
    raw = _read_yaml(yaml_path)
    if not isinstance(raw, dict):
        raise BadInputError([f"{yaml_path}: expected a mapping with keys {', '.join(TOP_KEYS)}"])
    problems = _unknown_keys(str(yaml_path), raw, TOP_KEYS)
    base = yaml_path.parent

    name = raw.get("name", yaml_path.stem)
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{yaml_path}: 'name' must be a non-empty string")
    root_value = raw.get("image_root", ".")
    image_root: Path | None = None
    if not isinstance(root_value, str) or not root_value.strip():
        problems.append(f"{yaml_path}: 'image_root' must be a path (relative to the benchmark file)")
    elif (root_value := _expand(str(yaml_path), "image_root", root_value, problems)) is None:
        pass
    elif not (base / root_value).is_dir():
        problems.append(f"{yaml_path}: image_root '{root_value}' is not a directory ({base / root_value})")
    else:
        image_root = (base / root_value).resolve()

    pretrain = {}
    for key in ("pretrain", "pretrain_first"):
        if raw.get(key) is not None:
            pretrain[key] = _path_field(str(yaml_path), raw, key, base, problems)
            _load_split(str(yaml_path), key, pretrain[key], image_root, check_images, 0, problems)
    if "pretrain_first" in pretrain and "pretrain" not in pretrain:
        problems.append(f"{yaml_path}: 'pretrain_first' needs a 'pretrain' file too (the stage it comes before)")

    tasks_raw = raw.get("tasks")
    if tasks_raw is None or tasks_raw == []:
        problems.append(f"{yaml_path}: no tasks (the 'tasks' list is missing or empty)")
        tasks_raw = []
    elif not isinstance(tasks_raw, list):
        problems.append(f"{yaml_path}: 'tasks' must be a list of tasks")
        tasks_raw = []

    tasks: list[TaskSpec] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(tasks_raw):
        fields, found = _check_task(yaml_path, index, entry, seen)
        problems += found
        task_name = fields.get("name")
        where = f"{yaml_path}: task '{task_name}'" if task_name else f"{yaml_path}: task {index}"
        train = _load_split(where, "train", fields.get("train"), image_root, check_images, max_train,
                            problems)
        test = _load_split(where, "test", fields.get("test"), image_root, check_images, max_test,
                           problems)
        if not found and fields["test"]:
            found = _check_references(fields["test"], fields["scorer"], test)
            problems += found
        if not found and fields["train"] and fields["test"]:
            tasks.append(TaskSpec(fields["name"], train, test, fields["scorer"],
                                  fields["train"], fields["test"], fields["scorer_params"]))
    if problems:
        raise BadInputError(problems)
    return Benchmark(name=name, path=yaml_path, image_root=image_root, tasks=tuple(tasks),
                     pretrain_file=pretrain.get("pretrain"), pretrain_first_file=pretrain.get("pretrain_first"))

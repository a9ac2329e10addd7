"""Reading a ``results/matrix.json`` someone hands us: every malformed file is bad input naming the file and
the cell, never a traceback and never a silently wrong metric."""
from __future__ import annotations

import json
import math
from pathlib import Path

from cramcl.errors import BadInputError


def check_scores(scores, where: str) -> list[list[float | None]]:
    """A T x T' matrix (T' tasks, at most T' rows, each row T' cells) of numbers in [0, 100] or null.

    Booleans, strings, NaN, infinities and values outside 0-100 are refused, each naming its cell."""
    if not isinstance(scores, list) or not scores:
        raise BadInputError(f"{where}: 'scores' must be a non-empty list of rows")
    if not all(isinstance(row, list) for row in scores):
        bad = next(t for t, row in enumerate(scores) if not isinstance(row, list))
        raise BadInputError(f"{where}: scores[{bad}] is not a row (a list): the matrix must be 2-D")
    width = len(scores[0])
    problems = []
    if len(scores) > width:
        problems.append(f"{where}: {len(scores)} rows but {width} tasks (rows are 'after task t', at most one per task)")
    for t, row in enumerate(scores):
        if len(row) != width:
            problems.append(f"{where}: scores[{t}] has {len(row)} cells, scores[0] has {width} (ragged matrix)")
            continue
        for i, v in enumerate(row):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                problems.append(f"{where}: scores[{t}][{i}] = {v!r} is not a number or null")
            elif not math.isfinite(v) or not 0.0 <= v <= 100.0:
                problems.append(f"{where}: scores[{t}][{i}] = {v!r} is not a score in 0-100")
    if problems:
        raise BadInputError(problems[:20] + ([f"{where}: ... and {len(problems) - 20} more"] if len(problems) > 20 else []))
    return scores


def read_matrix(path: Path) -> dict:
    """Load and check a matrix.json: {"scores": [[...]], optional "tasks": [names]} (bad input otherwise)."""
    path = Path(path)
    data = read_json_object(path, "matrix.json")
    if "scores" not in data:
        raise BadInputError(f"{path}: not a matrix.json (expected an object with 'scores')")
    scores = check_scores(data["scores"], str(path))
    tasks = data.get("tasks")
    if tasks is not None and (not isinstance(tasks, list) or len(tasks) != len(scores[0])
                              or not all(isinstance(t, str) for t in tasks)):
        raise BadInputError(f"{path}: 'tasks' must list {len(scores[0])} task names, one per column")
    return data


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object file the package wrote (``what``: "metrics.json"), read back: a directory in its place, a
    file cut off by a full disk or a crash, or one nested too deeply is bad input naming the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise BadInputError(f"{path}: is a directory, not a {what}") from None
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path}: not UTF-8 text (byte {e.start}), not a {what}") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = json.loads(text, parse_constant=lambda c: float(c))
    except json.JSONDecodeError as e:
        cut = " (cut off?)" if e.pos >= len(text.rstrip()) else ""
        raise BadInputError(f"{path}: not a {what}: invalid JSON at line {e.lineno}, column {e.colno}{cut}: "
                            f"{e.msg}") from None
    except RecursionError:
        raise BadInputError(f"{path}: not a {what}: invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: not a {what} (expected an object)")
    return data

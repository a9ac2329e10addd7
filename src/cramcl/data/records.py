"""Reading and checking one records file (a task's train or test split).

Two formats are accepted, detected by content (not by file extension), in either slot:

* LLaVA JSON: a JSON list of ``{"id", "image", "conversations": [{"from": "human", "value":
  "<image>\\n..."}, {"from": "gpt", "value": "..."}]}``. Only the first human turn and the first gpt
  turn after it are kept: multi-turn conversations are cut to their first pair, because every task here
  is one question about one image.
* JSONL QA: one ``{"id", "image", "question", "answer"}`` object per line. ``answer`` may be a list of
  acceptable strings: the first becomes ``Record.answer`` and all of them ``Record.answers``.

A file whose first non-space character is ``[`` is a JSON list, anything else is JSONL. Each object is
parsed by its keys (``conversations`` means LLaVA), so a JSON list of QA objects also works.

Problems are collected, never raised: the caller wants every problem of every file in one report.
Each is one line: ``"<file>: record <index> (id '<id>'): <reason>"``, with ``<index>`` the 0-based
position of the record in the file (JSONL: among its non-blank lines).
"""
from __future__ import annotations

import errno
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from cramcl.errors import BadInputError

_IMAGE_MARK = re.compile(r"\n*<image>\n*")


@dataclass(frozen=True)
class Record:
    """One question about one image.

    ``image`` is absolute and resolved (symlinks followed) and lies inside the benchmark's
    image_root. ``answers`` holds every acceptable answer when the file gave a list, else ``()``.
    """

    id: str
    image: Path
    question: str
    answer: str
    answers: tuple[str, ...] = ()


def path_problem(exc: Exception) -> str:
    """Why resolving or opening a path failed, in a few words (a symlink loop raises RuntimeError)."""
    if isinstance(exc, RuntimeError) or (isinstance(exc, OSError) and exc.errno == errno.ELOOP):
        return "a symlink loop"
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def resolve_file(path: Path) -> tuple[Path | None, str | None]:
    """``(resolved path, None)`` for an existing file, else ``(None, why)``: not found, a symlink loop, a name
    the filesystem refuses."""
    try:
        resolved = Path(path).expanduser().resolve()
        if resolved.is_file():
            return resolved, None
    except (ValueError, OSError, RuntimeError) as exc:
        return None, path_problem(exc)
    return None, "not found"


def check_image(path: Path) -> str | None:
    """Open an image fully; return why it cannot be used, or None when it decodes.

    ``verify()`` catches truncated or corrupt headers and chunks; a second open plus ``load()``
    catches pixel data that does not decode (verify does not decode it).
    """
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(exc).__name__}: {exc}"
    return None


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8: line and column of the first bad byte (1-based)."""
    data = exc.object if isinstance(exc.object, (bytes, bytearray)) else b""
    start = exc.start  # (utf-8-sig: counted after a byte-order mark, which is no character)
    line = data.count(b"\n", 0, start) + 1
    column = start - (data.rfind(b"\n", 0, start) + 1) + 1
    return f"not UTF-8 (byte 0x{data[start]:02x} at line {line}, column {column}); save the file as UTF-8"


def _clean_question(text: str) -> str:
    """Drop the ``<image>`` marker and the newlines around it."""
    return _IMAGE_MARK.sub("\n", text).strip()


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _parse_llava(obj: dict) -> tuple[str | None, Any, str | None]:
    """Return (question, answer, reason) from a LLaVA conversation; reason is set on failure."""
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        return None, None, "'conversations' must be a non-empty list of turns"
    turns = [t for t in conv if isinstance(t, dict)]
    human = next((i for i, t in enumerate(turns) if t.get("from") == "human"), None)
    if human is None:
        return None, None, "missing question (no 'human' turn in 'conversations')"
    question = turns[human].get("value")
    if not isinstance(question, str):
        return None, None, "missing question (the human turn has no string 'value')"
    gpt = next((t for t in turns[human + 1:] if t.get("from") == "gpt"), None)
    if gpt is None:
        return _clean_question(question), None, "missing answer (no 'gpt' turn after the human turn)"
    answer = gpt.get("value")
    if not isinstance(answer, str):
        return _clean_question(question), None, "missing answer (the gpt turn has no string 'value')"
    return _clean_question(question), answer, None


def _parse_record(obj: Any, image_root: Path) -> tuple[dict, list[str]]:
    """Check one decoded object; return its fields and the reasons it is bad (may be several)."""
    if not isinstance(obj, dict):
        return {}, [f"expected a JSON object, got {type(obj).__name__}"]
    reasons: list[str] = []
    fields: dict[str, Any] = {}

    if "conversations" in obj:
        question, answer, why = _parse_llava(obj)
        if why:
            reasons.append(why)
    else:
        question, answer = obj.get("question"), obj.get("answer")
        if question is None:
            reasons.append("missing 'question' field")
        elif not isinstance(question, str):
            reasons.append("'question' must be a string")
            question = None
        if answer is None:
            reasons.append("missing 'answer' field")
    if question is not None and not question.strip():
        reasons.append("empty question")
    fields["question"] = question

    # An answer is a non-empty string, or (JSONL QA) a non-empty list of non-empty strings.
    if isinstance(answer, list):
        if not answer or not all(_nonempty_str(a) for a in answer):
            reasons.append("'answer' list must hold one or more non-empty strings")
        else:
            fields["answer"], fields["answers"] = answer[0], tuple(answer)
    elif isinstance(answer, str):
        if not answer.strip():
            reasons.append("empty answer")
        fields["answer"] = answer
    elif answer is not None:
        reasons.append(f"'answer' must be a string or a list of strings, got {type(answer).__name__}")

    image = obj.get("image")
    if not _nonempty_str(image):
        reasons.append("missing 'image' field")
    else:
        # resolve() follows symlinks, so a link inside image_root pointing outside is caught too.
        try:
            resolved = (image_root / image).resolve()
            is_file = resolved.is_file()
        except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a name too long, a symlink loop, ...
            resolved, is_file = None, False
            shown = repr(image) if len(image) <= 80 else f"{image[:60]!r}... ({len(image)} characters)"
            reasons.append(f"image path {shown} is not a usable file name ({path_problem(exc)})")
        if resolved is None:
            pass
        elif not resolved.is_relative_to(image_root):
            reasons.append(f"image '{image}' is outside image_root '{image_root}'")
        elif not is_file:
            reasons.append(f"image '{image}' not found (looked for {resolved})")
        else:
            fields["image"] = resolved
    return fields, reasons


def _load_objects(path: Path, text: str) -> tuple[list[Any], list[str]]:
    """Decode a file's text into objects. Returns (objects, problems); a bad line becomes None."""
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return [], [f"{path}: line {exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})"]
        except RecursionError:
            return [], [f"{path}: invalid JSON: nested too deeply to be a records file"]
        return data, []
    objects: list[Any] = []
    problems: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            objects.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError) as exc:
            why = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            problems.append(f"{path}: line {lineno}: invalid JSON: {why}")
            objects.append(None)  # keeps record indices aligned with the non-blank lines
    return objects, problems


def read_records(
    path: Path, image_root: Path, *, check_images: bool = False
) -> tuple[list[Record], list[str]]:
    """Read a records file and check every record; return (good records, problems).

    Always checks fields, image paths (inside ``image_root`` after resolving symlinks) and that each
    image file exists (a cheap stat); with ``check_images`` it also decodes every image. Records with a
    problem are left out of the returned list. A record without an id gets ``"<file-stem>-<index>"``.
    """
    path = Path(path)
    image_root = Path(image_root).resolve()
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except FileNotFoundError:
        return [], [f"{path}: file not found"]
    except UnicodeDecodeError as exc:
        return [], [f"{path}: {_not_utf8(path, exc)}"]
    except OSError as exc:
        return [], [f"{path}: cannot read: {exc}"]
    if not text.strip():
        return [], [f"{path}: file is empty (no records)"]

    objects, problems = _load_objects(path, text)
    records: list[Record] = []
    first_index: dict[str, int] = {}
    for index, obj in enumerate(objects):
        if obj is None:  # invalid JSON line, already reported with its line number
            continue
        raw_id = obj.get("id") if isinstance(obj, dict) else None
        where = f"{path}: record {index}" + (f" (id '{raw_id}')" if raw_id is not None else "")
        fields, reasons = _parse_record(obj, image_root)
        if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
            reasons.append(f"'id' must be a string, got {type(raw_id).__name__}")
        rid = str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else f"{path.stem}-{index}"
        if rid in first_index:
            reasons.append(f"duplicate id '{rid}' (first used by record {first_index[rid]})")
        else:
            first_index[rid] = index
        if not reasons and check_images:
            why = check_image(fields["image"])
            if why:
                reasons.append(f"image '{obj['image']}' unreadable: {why}")
        problems.extend(f"{where}: {reason}" for reason in reasons)
        if not reasons:
            records.append(Record(id=rid, image=fields["image"], question=fields["question"],
                                  answer=fields["answer"], answers=fields.get("answers", ())))
    if not objects and not problems:
        problems.append(f"{path}: no records")
    return records, problems


def open_rgb(path: Path):
    """The image at ``path`` as an RGB PIL image; an unreadable file is bad input naming it (exit 2)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise BadInputError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None

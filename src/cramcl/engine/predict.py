"""`cramcl predict`: ask a finished run new questions, with no task id, through the evaluation code path.

Inputs are one image + question, or a JSONL file of ``{"id"?, "image", "question"}`` records (image paths
relative to the file); answers come back as JSONL ``{"id", "image", "question", "answer"}`` plus, with
``explain``, how the method routed the record (CRAM: cosines to the group prototypes, the group, each
expert's weight per layer).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from cramcl.data.records import Record, check_image, resolve_file
from cramcl.engine.session import open_finished_run
from cramcl.errors import BadInputError
from cramcl.eval.evaluate import predict


def read_questions(path: Path) -> list[Record]:
    """Records of a JSONL file of questions; every problem is bad input naming the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    records, problems = [], []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            problems.append(f"{path}: line {n}: invalid JSON")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not isinstance(obj.get("question"), str):
            problems.append(f"{path}: line {n}: needs string fields 'image' and 'question'")
            continue
        image, why = resolve_file(path.parent / obj["image"])
        if why is None and (unreadable := check_image(image)):
            why = f"unreadable: {unreadable}"
        if why:
            problems.append(f"{path}: line {n}: image '{obj['image']}' {why}")
            continue
        records.append(Record(id=str(obj.get("id", f"line-{n}")), image=image, question=obj["question"], answer=""))
    if problems:
        raise BadInputError(problems)
    if not records:
        raise BadInputError(f"{path}: no questions")
    return records


def one_question(image: str, question: str) -> list[Record]:
    path, why = resolve_file(Path(image))  # not found, a symlink loop, ...
    if why is None and (unreadable := check_image(path)):
        why = f"unreadable image: {unreadable}"
    if why:
        raise BadInputError(f"--image {image}: {why}")
    if not question.strip():
        raise BadInputError("--question: empty")
    return [Record(id="input", image=path, question=question.strip(), answer="")]


def unreadable_words(tokenizer, records: list[Record]) -> tuple[list[str], int]:
    """(words of the questions a word-level vocabulary lacks, in order met, and how many questions hold one)."""
    words: dict[str, None] = {}
    hit = 0
    for r in records:
        found = [w for w in tokenizer.normalizer.normalize_str(r.question).split() if tokenizer.token_to_id(w) is None]
        words.update(dict.fromkeys(found))
        hit += bool(found)
    return list(words), hit


def warn_unreadable_words(backbone, records: list[Record]) -> None:
    """The tiny backbone reads a word outside its vocabulary as one unknown token: say which words, on standard
    error, so that an answer that ignores them is not a surprise (a real model's subword tokenizer reads all)."""
    tokenizer = getattr(backbone, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "token_to_id") or getattr(tokenizer, "normalizer", None) is None:
        return
    words, hit = unreadable_words(tokenizer, records)
    if words:
        shown = ", ".join(repr(w) for w in words[:10]) + (f" and {len(words) - 10} more" if len(words) > 10 else "")
        which = f"record '{records[0].id}'" if len(records) == 1 else f"{hit} of {len(records)} questions"
        print(f"cramcl: warning: the model's vocabulary lacks {shown} ({which}); it reads each as an unknown word, "
              "so the answer cannot depend on it", file=sys.stderr)


def predict_run(run_dir: Path, records: list[Record], *, explain: bool = False, after_task: int | None = None,
                log=lambda *a: None) -> list[dict]:
    """One answer row per record from the run's checkpoint (its last one by default)."""
    session, _, _ = open_finished_run(Path(run_dir), after_task, log=log)
    method = session.method
    if method.uses_task_id_at_eval:
        raise BadInputError(f"{run_dir}: method '{session.cfg.method}' routes by the true task id, which a new "
                            "question does not have; predict needs a method that infers it")
    warn_unreadable_words(session.backbone, records)
    session.backbone.prepare(records, desc="image features")
    answers = predict(session.accelerator, session.backbone, method, records, session.cfg.train.eval_batch_size,
                      desc="predict", loader_workers=session.loader_workers)
    rows = [{"id": r.id, "image": str(r.image), "question": r.question, "answer": a} for r, a in zip(records, answers)]
    describe = getattr(method, "describe_routing", None)
    if explain:
        for row, record in zip(rows, records):
            row["routing"] = (describe(session.backbone.collate([record], train=False)) if describe
                              else f"{session.cfg.method} gives no routing explanation")
    return rows

"""The Python API: the same operations as the command line (which is a thin layer over these functions).

    import cramcl

    cfg = cramcl.load_config(method="cram", profile="quick", overrides=["train.steps_per_task=20"])
    matrix = cramcl.run(cfg, "runs/mine")                    # the accuracy matrix (matrix.json's dict)
    run = cramcl.open_run("runs/mine")
    run.metrics["MFN"]; run.matrix["scores"]
    run.predict([{"image": "cat.png", "question": "What do you see?"}])    # no task id
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cramcl.config import RunConfig, resolve_config
from cramcl.data.records import Record
from cramcl.engine.compare import run_compare
from cramcl.engine.export import export_peft
from cramcl.engine.multi_seed import run_seeds
from cramcl.engine.predict import one_question, predict_run
from cramcl.engine.run_lock import reader_note
from cramcl.engine.runner import run_stream
from cramcl.engine.session import open_finished_run
from cramcl.errors import BadInputError


def load_config(*, method: str | None = None, profile: str | None = None, config_file: str | None = None,
                benchmark: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The fully resolved settings, exactly as ``cramcl run`` resolves them (method defaults < profile <
    ``config_file`` < ``overrides`` of the form ``"train.lr=3e-4"``). Bad settings raise BadInputError."""
    return resolve_config(method=method, profile=profile, config_file=config_file, benchmark=benchmark,
                          overrides=list(overrides))


def run(config: RunConfig, out: str | Path, *, seeds: list[int] | None = None, log=print) -> dict:
    """Train ``config``'s method on its stream into the run directory ``out``, evaluating after every task.

    Returns matrix.json's dict; with ``seeds``, one run per seed in ``out/seed_<s>`` and the summary dict
    (mean and sample std of every metric and final-row cell)."""
    if seeds:
        return run_seeds(config, Path(out), list(seeds), log=log)
    return run_stream(config, Path(out), log=log)


def resume(out: str | Path, *, log=print) -> dict:
    """Continue the interrupted run in ``out`` with its saved settings; returns matrix.json's dict."""
    return run_stream(None, Path(out), resume=True, log=log)


def compare(methods: list[str], out: str | Path, *, profile: str | None = None, config_file: str | None = None,
            benchmark: str | None = None, overrides: list[str] | tuple[str, ...] = (),
            seeds: list[int] | None = None, log=print) -> dict:
    """Several methods (or variants ``"cram:routing=oracle"``) on one stream and budget; compare.json's dict."""
    return run_compare(list(methods), Path(out), profile=profile, config_file=config_file, benchmark=benchmark,
                       overrides=list(overrides), seeds=seeds, log=log)


@dataclass
class FinishedRun:
    """A run directory: its results, and answers to new questions from its last (or a chosen) checkpoint."""

    path: Path

    @property
    def matrix(self) -> dict:
        """results/matrix.json: {"method", "tasks", "scores"[t][i], "scorers"}."""
        return json.loads((self.path / "results" / "matrix.json").read_text())

    @property
    def in_progress(self) -> str | None:
        """One line naming the run that still writes this directory (what is read here is then its finished
        task checkpoints, the last one by default); None when no writer holds it."""
        return reader_note(self.path)

    @property
    def metrics(self) -> dict:
        """results/metrics.json: MFT, MFN, MAA, BWT, forgetting, parameter counts, times, method analysis."""
        return json.loads((self.path / "results" / "metrics.json").read_text())

    def predict(self, questions: list[dict], *, explain: bool = False, after_task: int | None = None) -> list[dict]:
        """Answers to ``[{"image": path, "question": text, "id"?: str}]`` with no task id, through the
        evaluation code path; each row gains "answer" (and "routing" with ``explain``)."""
        records: list[Record] = []
        for n, q in enumerate(questions):
            (rec,) = one_question(str(q["image"]), str(q["question"]))
            records.append(Record(id=str(q.get("id", n)), image=rec.image, question=rec.question, answer=""))
        return predict_run(self.path, records, explain=explain, after_task=after_task)

    def export_peft(self, task: str, out: str | Path) -> Path:
        """That task's expert as a PEFT LoRA adapter directory (what it cannot carry: docs/cram.md, "Taking an
        expert elsewhere: PEFT export")."""
        session, _, _ = open_finished_run(self.path, log=lambda *a: None)
        return export_peft(session, task, Path(out))


def open_run(path: str | Path) -> FinishedRun:
    """A finished (or partly finished) run directory."""
    path = Path(path)
    if not (path / "config.yaml").exists():
        raise BadInputError(f"{path / 'config.yaml'}: not found; not the directory of a cramcl run")
    return FinishedRun(path)

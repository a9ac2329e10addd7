"""A small study benchmark for the multiple-choice letter format (README.md of this folder; its stream is
``cramcl-builtin/4``'s, its stem and tail the study's, not the built-in stream's).

``generate_mc_study(out_dir, instruct=...)`` writes a benchmark of four tasks in training order
``shape, mc-shape, corner, mc-digit`` (shape and corner exactly as in the built-in stream, same seeds)
and a ``pretrain.jsonl`` holding the built-in stream's caption corpus plus captions of the mc-shape
domain; with ``instruct=True`` it also holds generic instruction-following records on the same held-apart
images (:func:`mc_tasks.instruction_samples`). ``tasks`` picks other study tasks (for
example ``mc-colour`` or ``mc-corner``); with shape, mc-shape and corner among them the pretrain corpus stays the same
(its exclusions follow those three tasks' test images).

    python studies/mc-format/mc_study.py PLAIN_OUT INSTRUCT_OUT
    python studies/mc-format/mc_study.py --mc-heavy OUT [shape,mc-shape,corner,mc-digit,mc-colour]
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

import mc_tasks

from cramcl.data.builtin import (PRETRAIN_QUESTION, TASK_INFO, BuiltinTask, choice, pretrain_samples,
                                 write_pretrain_records, write_tasks, write_yaml)
from cramcl.data.builtin._common import Sample

#: The built-in stream as the study ran on it (``cramcl-builtin/4``: nine tasks, no multiple choice): its task
#: positions seed the images and its shares make the caption corpus, so the study's commands keep their output.
V4_SHARES = {"shape": 0.17, "digits": 0.12, "corner": 0.12, "caption": 0.1, "colour": 0.1, "ocr": 0.12,
             "digit-corner": 0.12, "count": 0.1, "stripes": 0.05}
V4_TASKS = tuple(dataclasses.replace(t, pretrain_share=V4_SHARES[t.name]) for t in TASK_INFO if t.name in V4_SHARES)

MC_TASKS = (
    BuiltinTask("mc-shape", "choice", "exact", "tinted-shapes", choice.make_mc_shape, 0.1),
    BuiltinTask("mc-digit", "choice", "exact", "digits", mc_tasks.make_mc_digit, 0.0),
    BuiltinTask("mc-colour", "choice", "exact", "blobs", mc_tasks.make_mc_colour, 0.0),
    BuiltinTask("mc-corner", "choice", "exact", "corner-shapes", mc_tasks.make_mc_corner, 0.0),
    BuiltinTask("mc-colour3", "choice", "exact", "blobs", mc_tasks.make_mc_colour3, 0.0),
    BuiltinTask("mc-corner3", "choice", "exact", "corner-shapes", mc_tasks.make_mc_corner3, 0.0),
    BuiltinTask("mc-corner-fixed", "choice", "exact", "corner-shapes", choice.make_mc_corner_fixed, 0.0),
)
_BY_NAME = {t.name: (i, t) for i, t in enumerate(V4_TASKS)}
_BY_NAME.update({t.name: (len(V4_TASKS) + i, t) for i, t in enumerate(MC_TASKS)})
ORDER = ("shape", "mc-shape", "corner", "mc-digit")


def _pretrain_samples(seed: int, n: int, image_size: int, test_hashes: dict[str, set[str]]) -> list[Sample]:
    """The built-in stream's caption corpus plus captions of the mc-shape domain."""
    index, mc = _BY_NAME["mc-shape"]
    return pretrain_samples(seed, n, image_size, test_hashes, V4_TASKS) + mc.make(
        "pretrain", round(n * mc.pretrain_share), (seed, index), image_size, test_hashes.get("mc-shape", set()))


def generate_mc_study(out_dir: str | Path, *, instruct: bool, mc_heavy: bool = False, seed: int = 0,
                      n_train: int = 500, n_test: int = 200, image_size: int = 64, n_pretrain: int | None = None,
                      tasks: tuple[str, ...] = ORDER) -> Path:
    """Write the study benchmark into ``out_dir`` (replaced if present); return its YAML path."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    n_pretrain = n_pretrain or max(50, round(n_train * 1500 / 800))
    params = {"seed": seed, "n_train": n_train, "n_test": n_test, "image_size": image_size}
    test_hashes = write_tasks(out, [_BY_NAME[name] for name in tasks], params)
    samples = _pretrain_samples(seed, n_pretrain, image_size, test_hashes)
    records = [(PRETRAIN_QUESTION, s.caption, s) for s in samples]
    if instruct:
        records += [(s.question, s.answer, s) for s in mc_tasks.instruction_samples(samples, seed, mc_heavy=mc_heavy)]
    order = np.random.default_rng([seed, 4242]).permutation(len(records))
    write_pretrain_records(out, [records[i] for i in order])
    header = (f"cramcl multiple-choice study (instruct={instruct}, mc_heavy={mc_heavy}, seed={seed}, "
              f"n_train={n_train}, n_test={n_test}, n_pretrain={n_pretrain})")
    return write_yaml(out, header, "cramcl-mc-study", [_BY_NAME[name][1] for name in tasks])


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write the multiple-choice study's benchmarks.",
                                 epilog="PLAIN_OUT INSTRUCT_OUT: the plain and the instruction benchmark; "
                                        "--mc-heavy OUT [TASKS]: the MC-heavy one (TASKS comma-separated, "
                                        "default " + ",".join(ORDER) + ")")
    ap.add_argument("--mc-heavy", action="store_true", help="write one MC-heavy benchmark: OUT [TASKS]")
    ap.add_argument("paths", nargs="+", metavar="PATH")
    args = ap.parse_args(argv)
    if args.mc_heavy:
        if len(args.paths) > 2:
            ap.error("--mc-heavy takes OUT [TASK,TASK,...]")
        tasks = tuple(args.paths[1].split(",")) if len(args.paths) > 1 else ORDER
        print(generate_mc_study(args.paths[0], instruct=True, mc_heavy=True, tasks=tasks))
    else:
        if len(args.paths) != 2:
            ap.error("give PLAIN_OUT INSTRUCT_OUT")
        for flag, path in (("0", args.paths[0]), ("1", args.paths[1])):
            print(generate_mc_study(path, instruct=flag == "1"))


if __name__ == "__main__":
    main()

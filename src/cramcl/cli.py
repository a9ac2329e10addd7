"""The command line (thin: parse, resolve the config, call the library). Exit: 0 ok, 2 bad input, 1 internal.

Each command function imports the modules it calls when it runs: the engine and report modules load torch,
transformers or matplotlib, and even the light ones add to every start, which ``cramcl --help`` and a
mistyped argument should not wait for.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import traceback
from pathlib import Path

from cramcl.config import PROFILES, resolve_config
from cramcl.errors import BadInputError, TrainingFault
from cramcl.faults import BACKGROUND_FAULTS, background_thread_fault, environment_fault


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cramcl", description="Multimodal continual instruction tuning: CRAM and "
                                "the field's other methods on one stream.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def run_args(sp, methods_flag: bool):
        sp.add_argument("--config", help="a YAML file of settings (see configs/)")
        sp.add_argument("--benchmark", help="a benchmark YAML (default: the built-in stream)")
        if methods_flag:
            sp.add_argument("--methods", required=True, help="comma-separated method names or variants "
                            "NAME:key=value[:key=value], e.g. cram,cram:routing=oracle,lora-ft")
        else:
            sp.add_argument("--method", help="method name (default: cram), or a method of your own: "
                            "path/to/file.py:ClassName or package.module:ClassName")
        sp.add_argument("--profile", choices=list(PROFILES), help="quick: ~1 min smoke run; default: the demo; "
                        "paper: the CRAM paper's training protocol for real models (docs/real-models.md)")
        sp.add_argument("--out", help="run directory (default: runs/<method>-<profile>)")
        sp.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2: one run per seed in OUT/seed_<s>/ "
                        "and a mean +- std summary")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=3e-4 method.rank=8")

    r = sub.add_parser("run", help="train a method on a stream, evaluating after every task")
    run_args(r, methods_flag=False)
    r.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (settings given "
                   "with it must not change the saved run)")
    r.add_argument("--no-validate", action="store_true", help="skip decoding every image before training (huge "
                   "sets); a bad record is then named when it is met")
    r.add_argument("--force", action="store_true", help="with --resume: accept changes that cannot alter computed "
                   "results (train.eval_batch_size, train.log_every, train.progress_seconds, "
                   "train.step_checkpoint_every)")

    c = sub.add_parser("compare", help="several methods on the same stream, seed and budget")
    run_args(c, methods_flag=True)

    e = sub.add_parser("eval", help="evaluate a run's checkpoint (no task id is given to the method)")
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument("--after-task", type=int, help="checkpoint index (default: the last finished task)")
    e.add_argument("--tasks", nargs="*", help="task names (default: every task)")

    m = sub.add_parser("metrics", help="print the continual metrics of a matrix.json")
    m.add_argument("matrix", help="DIR/results/matrix.json")
    m.add_argument("--format", choices=["md", "json", "csv"], default="md")

    v = sub.add_parser("validate", help="check every record and image of a benchmark")
    v.add_argument("--benchmark", required=True)

    pr = sub.add_parser("predict", help="answer new questions with a finished run (no task id)")
    pr.add_argument("--run", required=True, help="run directory")
    pr.add_argument("--image", help="an image file (with --question)")
    pr.add_argument("--question", help="the question about --image")
    pr.add_argument("--records", help="a JSONL file of {\"id\", \"image\", \"question\"} (images relative to it)")
    pr.add_argument("--out", help="write the answers as JSONL here (default: standard output)")
    pr.add_argument("--explain", action="store_true", help="also show how the method routed each record")
    pr.add_argument("--after-task", type=int, help="checkpoint index (default: the last finished task)")

    ex = sub.add_parser("export", help="write one task's expert as a PEFT LoRA adapter directory, or (--format "
                                       "base) the run's frozen tiny base as a saved base for backbone.base_path")
    ex.add_argument("--run", required=True, help="run directory")
    ex.add_argument("--task", help="the task whose expert to export (--format peft)")
    ex.add_argument("--format", choices=["peft", "base"], default="peft")
    ex.add_argument("--after-task", type=int, help="checkpoint index (default: the last finished task)")
    ex.add_argument("out", metavar="OUT", help="a new (or empty) directory")

    i = sub.add_parser("inspect", help="adapted modules, parameter counts and routing state")
    i.add_argument("--config", help="a YAML file of settings (without --run: the model it would build)")
    i.add_argument("--method", help="method name (without --run; default: cram)")
    i.add_argument("--profile", choices=list(PROFILES), help="profile (without --run)")
    i.add_argument("--run", help="a run directory (its last checkpoint)")
    i.add_argument("--record", help="show how this test record id is routed (with --run)")
    i.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return p


def _cmd_run(args) -> int:
    from cramcl.engine.runner import run_stream
    from cramcl.eval.metrics import continual_metrics
    from cramcl.methods.registry import method_label

    asked = None
    if args.force and not args.resume:
        raise BadInputError("--force only applies with --resume")
    if args.resume:
        if not args.out:
            raise BadInputError("--resume needs --out DIR (the run to continue)")
        cfg = None
        asked = {"method": args.method, "profile": args.profile, "config_file": args.config,
                 "benchmark": args.benchmark, "overrides": args.overrides}
    else:
        cfg = resolve_config(method=args.method, profile=args.profile, config_file=args.config,
                             benchmark=args.benchmark, overrides=args.overrides)
    if args.no_validate:
        if cfg is None:
            asked["overrides"] = [*asked["overrides"], "data.validate_images=false"]
        else:
            cfg.data.validate_images = False
    if args.out:
        out = Path(args.out)
    else:
        out = Path(f"runs/{method_label(cfg.method)}-{cfg.profile}")
    if args.seeds is not None:  # `--seeds ''` is refused, never read as no seeds
        from cramcl.engine.multi_seed import parse_seeds, run_seeds

        summary = run_seeds(cfg, out, parse_seeds(args.seeds), resume=args.resume, asked=asked, force=args.force)
        print(f"done: {out}/summary.md")
        print(json.dumps({m: [s["mean"], s["std"]] for m, s in summary["metrics"].items()}))
        return 0
    matrix = run_stream(cfg, out, resume=args.resume, asked=asked, force=args.force)
    print(f"done: {out}/report.md")
    print(json.dumps({k: (round(v, 2) if v == v else None) for k, v in continual_metrics(matrix["scores"]).items()}))
    return 0


def _cmd_compare(args) -> int:
    from cramcl.engine.compare import run_compare
    from cramcl.engine.multi_seed import parse_seeds

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = Path(args.out or "runs/compare")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    run_compare(methods, out, profile=args.profile, config_file=args.config, benchmark=args.benchmark,
                overrides=args.overrides, seeds=seeds)
    print(f"done: {out}/compare.md")
    return 0


def _cmd_eval(args) -> int:
    from cramcl.engine.runner import evaluate_tasks
    from cramcl.engine.session import open_finished_run

    session, after, _ = open_finished_run(Path(args.run), args.after_task)
    tasks = list(session.bench.tasks)
    if args.tasks:
        unknown = [t for t in args.tasks if t not in [x.name for x in tasks]]
        if unknown:
            raise BadInputError([f"--tasks: unknown task '{t}'" for t in unknown])
        tasks = [t for t in tasks if t.name in args.tasks]
    scores = evaluate_tasks(session, tasks, Path(args.run) / "results" / "eval" / f"after_{after}", after)
    for name, score in scores.items():
        print(f"{name}\t{score:.2f}")
    return 0


def _cmd_metrics(args) -> int:
    from cramcl.eval.matrix_io import read_json_object, read_matrix
    from cramcl.eval.metrics import continual_metrics, json_safe
    from cramcl.report.report import format_metrics

    path = Path(args.matrix)
    scores = read_matrix(path)["scores"]
    metrics = json_safe(continual_metrics(scores))
    full = path.parent / "metrics.json"
    if full.exists():  # keep parameter counts and times when they are there
        metrics = {**read_json_object(full, "metrics.json"), **metrics}
    print(format_metrics(metrics, args.format))
    return 0


def _cmd_validate(args) -> int:
    from cramcl.data.validate import summarize, validate_benchmark

    bench, problems = validate_benchmark(args.benchmark)
    if problems:
        raise BadInputError(problems)
    n = sum(len(t.train) + len(t.test) for t in bench.tasks)
    print(f"{args.benchmark}: ok ({len(bench.tasks)} tasks, {n} records, every image readable)")
    print("\n".join(summarize(bench)[1:]))  # per task: the scorer it will use, with its settings
    return 0


def _cmd_inspect(args) -> int:
    from cramcl.engine.inspect_run import inspect_config, inspect_run

    if args.run:
        print(inspect_run(Path(args.run), record_id=args.record))
    else:
        print(inspect_config(args.config, args.overrides, method=args.method, profile=args.profile))
    return 0


def _cmd_predict(args) -> int:
    from cramcl.engine.predict import one_question, predict_run, read_questions

    one = args.image is not None or args.question is not None  # an empty --question is named below, not missing
    if (args.records is not None) == one:
        raise BadInputError("predict: give either --image and --question, or --records FILE.jsonl")
    if not args.records and (args.image is None or args.question is None):
        raise BadInputError("predict: --image and --question go together")
    if args.out is not None:  # before the model is loaded: the answers need a file name
        answers = Path(args.out)
        if answers.is_dir():
            raise BadInputError(f"--out {answers}: is a directory; give the name of a file for the answers (JSONL)")
        if answers.parent.exists() and not answers.parent.is_dir():
            raise BadInputError(f"--out {answers}: {answers.parent} is not a directory")
    records = read_questions(Path(args.records)) if args.records else one_question(args.image, args.question)
    rows = predict_run(Path(args.run), records, explain=args.explain, after_task=args.after_task)
    if args.out:
        from cramcl.eval.evaluate import write_jsonl_atomic

        write_jsonl_atomic(Path(args.out), rows)
    else:
        sys.stdout.write("".join(json.dumps(row) + "\n" for row in rows))
    return 0


def _cmd_export(args) -> int:
    from cramcl.engine.export import export_base, export_peft
    from cramcl.engine.session import open_finished_run

    if args.format == "base":
        out = export_base(Path(args.run), Path(args.out))
        print(f"done: {out} (use it with backbone.base_path={out}: any stream whose words its vocabulary holds)")
        return 0
    if not args.task:
        raise BadInputError("export: --task is required with --format peft")

    session, _, _ = open_finished_run(Path(args.run), args.after_task, log=lambda *a: None)
    out = export_peft(session, args.task, Path(args.out))
    print(f"done: {out} (load with peft.PeftModel.from_pretrained(base, '{out}'); the task's expert alone, "
          "without routing)")
    return 0


COMMANDS = {"export": _cmd_export, "predict": _cmd_predict, "run": _cmd_run, "compare": _cmd_compare, "eval": _cmd_eval, "metrics": _cmd_metrics,
            "validate": _cmd_validate, "inspect": _cmd_inspect}


_SETTING = re.compile(r"^[A-Za-z_][\w.]*=")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; ``KEY=VALUE`` settings may stand anywhere on it, before or after options."""
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    settings = [e for e in extras if _SETTING.match(e)]
    if len(settings) != len(extras) or (settings and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if settings:
        args.overrides = [*args.overrides, *settings]
    return args


class _Terminated(Exception):
    """SIGTERM, turned into an exception so that the run ends through the same message as Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _raised_by(exc: BaseException, kind: type) -> bool:
    """Whether ``kind`` is ``exc`` or among the exceptions it was raised from or while handling."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _resume_hint(args) -> str:
    if args.command == "run":
        out = args.out or "runs/<method>-<profile>"
        return f"continue with: cramcl run --resume --out {out}" + (f" --seeds {args.seeds}" if args.seeds else "")
    if args.command == "compare":
        return f"continue with the same cramcl compare command (finished runs in {args.out or 'runs/compare'} are reused)"
    return "nothing was changed"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _in_main_thread() else None
    previous_hook, threading.excepthook = threading.excepthook, background_thread_fault
    BACKGROUND_FAULTS.clear()
    code = 1
    try:
        code = _dispatch(args)
        return code
    finally:
        threading.excepthook = previous_hook
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if code != 1:  # exit 1 has reported the fault itself, in one line
            for fault in BACKGROUND_FAULTS:
                print(f"cramcl: warning: {fault}", file=sys.stderr)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


READERS = ("eval", "predict", "inspect", "export")


def _note_run_in_progress(args) -> None:
    """A reader of a run that a writer still holds says so on stderr; it reads the finished task checkpoints
    (engine/run_lock.py), and never locks, so it cannot block or refuse the writer."""
    if args.command in READERS and getattr(args, "run", None):
        from cramcl.engine.run_lock import reader_note

        note = reader_note(Path(args.run))
        if note:
            print(f"cramcl: note: {note}", file=sys.stderr)


def _dispatch(args) -> int:
    try:
        _note_run_in_progress(args)
        return COMMANDS[args.command](args)
    except BadInputError as e:
        for problem in e.problems:
            print(f"cramcl: error: {problem}", file=sys.stderr)
        return 2
    except TrainingFault as e:
        print(f"cramcl: training fault: {e}", file=sys.stderr)
        if args.command == "run" and getattr(args, "out", None):
            print(f"cramcl: the last good checkpoint stays the resume point: cramcl run --resume --out {args.out}",
                  file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cramcl: interrupted; {_resume_hint(args)}", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"cramcl: terminated (SIGTERM); {_resume_hint(args)}", file=sys.stderr)
        return 143
    except Exception as e:  # an internal error: say so, with the traceback for the bug report
        if _raised_by(e, _Terminated):  # SIGTERM inside an import or callback that wrapped it (ImportError ...)
            print(f"cramcl: terminated (SIGTERM); {_resume_hint(args)}", file=sys.stderr)
            return 143
        out = getattr(args, "out", None) if args.command in ("run", "compare") else None
        fault = environment_fault(e, out, _resume_hint(args))
        if fault is not None:
            print(f"cramcl: fault: {fault}", file=sys.stderr)
            return 1
        traceback.print_exc()
        print("cramcl: internal error (exit 1); please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

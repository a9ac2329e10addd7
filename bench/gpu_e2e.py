"""The whole command line end to end at 7B shapes, one short script for a lent GPU (or ``--tiny`` on a CPU).

For each model (LLaVA-1.5-7B, Qwen2-VL-7B-Instruct shapes; random weights, nothing downloaded):

build     a random-weight checkpoint of the real config's sizes in bf16, written with ``save_pretrained`` into
          a temporary ``$CRAMCL_MODELS/<name>`` (the directory the repository's backbone file names), with an
          offline tokenizer and processor: the tiny builders of ``cramcl.backbones.hf.tiny_models`` give the
          architecture's config, special tokens, chat template and processor, with the real sizes (``FULL``)
          and image processor written over them (the builders themselves are never edited).
stream    a 3-task benchmark (YAML + JSONL records + PNG images: shape, colour, count).
full      ``cramcl run --method cram --config configs/backbones/<model>.yaml --benchmark ...`` with a few
          optimizer steps a task, uninterrupted (the reference).
killed    the same command in another directory with ``CRAMCL_KILL_AT=train_step:N``: SIGKILL inside task 1,
          after a step checkpoint.
resume    ``cramcl run --resume --out <killed>``: it continues from the step checkpoint and evaluates.
export    ``cramcl export --format peft`` of task 0's expert from the resumed run.

Each phase is a subprocess; the parent records its wall time, and the child's own sampler thread records
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (every 0.25 s and at exit; a SIGKILLed phase keeps
its last sample) and its peak host RSS; with ``nvidia-smi`` the parent also samples the GPU's used memory. The
resumed run's matrix, predictions and final method tensors are compared with the uninterrupted run's.
Writes ``summary.json`` and ``summary.md`` (after every phase, so a timeout keeps what finished), the phases'
logs and each run's small result files to ``--out`` (default ``$OUT``, else ./gpu-e2e).

    python bench/gpu_e2e.py                 # a GPU: both models, ~8 min (the plan is printed first)
    python bench/gpu_e2e.py --tiny          # a CPU: tiny widths, the same phases (tests/test_gpu_e2e_script.py)

This file is the entry point: its flags, the plan it prints, the loop over the models and the exit status.
bench/_e2e_inputs.py builds the checkpoints and the stream; bench/_e2e_phases.py runs one model's phases as
processes (each one this script again, as ``_child``), measures them, compares the runs and writes the summary.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # its helpers beside it, however it is started
    sys.path.insert(0, HERE)

from _e2e_inputs import MODELS, TASKS, write_stream  # noqa: E402
from _e2e_phases import Session, _child, run_model  # noqa: E402


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "peft", "torchvision"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def parse(argv):
    p = argparse.ArgumentParser(prog="python bench/gpu_e2e.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny widths on the CPU (the test's mode)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-e2e", help="results folder (default $OUT)")
    p.add_argument("--workdir", default=None, help="where the checkpoints and runs go (default: the temp dir)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps a task (default 4)")
    p.add_argument("--checkpoint-every", type=int, default=2, help="train.step_checkpoint_every (default 2)")
    p.add_argument("--kill-step", type=int, default=3, help="SIGKILL after this optimizer step of task 1")
    p.add_argument("--train-records", type=int, default=32, help="training records a task (default 32)")
    p.add_argument("--test-records", type=int, default=8, help="test records a task (default 8)")
    p.add_argument("--new-tokens", type=int, default=8, help="backbone.max_new_tokens (default 8)")
    p.add_argument("--eval-batch", type=int, default=64, help="train.eval_batch_size (default 64)")
    p.add_argument("--image-size", type=int, default=None, help="image side in px (default 672; --tiny 32)")
    p.add_argument("--budget-s", type=float, default=480, help="start no phase after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the work directory (checkpoints, runs)")
    p.add_argument("extra", nargs="*", help="further KEY=VALUE settings for every cramcl run")
    args = p.parse_args(argv)
    args.models = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in args.models if k not in MODELS]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")
    if not 0 < args.kill_step <= args.steps or args.kill_step <= args.checkpoint_every - 1:
        p.error("--kill-step must be in 1..--steps and after the first step checkpoint")
    args.image_size = args.image_size or (32 if args.tiny else 672)
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["_child"]:
        return _child(argv[1:])
    args = parse(argv)
    s = Session(args)
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else "none"
    per = ("~30-60 s build (init + save 14-17 GB), ~50-70 s full run, ~35-50 s killed, ~40-60 s resume, ~25-30 s "
           "export; each cramcl process loads the checkpoint again (~3-4 min a model, both within --budget-s)")
    s.summary["plan"] = plan = {
        "device": gpu, "models": args.models, "steps_per_task": args.steps, "tasks": list(TASKS),
        "train_records_per_task": args.train_records, "test_records_per_task": args.test_records,
        "image_px": args.image_size, "max_new_tokens": args.new_tokens,
        "step_checkpoint_every": args.checkpoint_every, "kill_at": f"train_step:{args.steps + args.kill_step}",
        "budget_s": args.budget_s, "workdir": str(s.work), "versions": _versions(),
        "estimate": "a few seconds a phase" if args.tiny else f"per model (a guess, not measured): {per}",
    }
    print("plan:\n" + "\n".join(f"  {k}: {v}" for k, v in plan.items()), flush=True)
    try:
        bench = write_stream(s.work / "stream", args.train_records, args.test_records, args.image_size)
        for key in args.models:
            run_model(s, key, bench)
    finally:
        s.write()
        if not args.keep:
            shutil.rmtree(s.work, ignore_errors=True)
    ok = all(all(p.get("rc") == (-9 if p["phase"] == "killed" else 0) for p in m["phases"])
             and "error" not in m.get("resume", {"error": ""}) for m in s.summary["models"].values())
    print(f"summary: {s.out / 'summary.md'}\n" + (s.out / "summary.md").read_text(), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The speed benchmarks, run one way from the repository root:

    python -m bench                  # list them
    python -m bench NAME --help      # one benchmark's flags
    python -m bench NAME [flags]     # run it

Each benchmark measures its variants side by side in one process and prints a table of medians and one JSON
line (``--json F`` also writes it, where the benchmark takes it). BENCHMARKS.md holds the numbers measured with
them and the commands that produced each. Research studies (one-off questions) are under studies/, not here.
"""
from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> what it measures and the target ratio, where there is one.
BENCHMARKS = {
    "adapter_layer": "one adapted linear, forward + backward, as the stream grows: routed per-sample cost "
                     "against the same group in a stream of only its tasks (target <= 1.10x at 30 tasks), "
                     "against plain LoRA of the same rank and a loop over experts",
    "ragged_forward": "the concatenated ragged-rank expert forward against a Python loop over the experts",
    "module_host_time": "host time of one adapted module's forward on tiny shapes (what a decoding step pays "
                        "per module): plain linear, LoRA, CRAM's routed module",
    "consolidation": "CRAM's consolidation (every module's SVD) against a task's training time "
                     "(target <= 1%)",
    "embedded_suite": "the embedded backbone on the CPU: CRAM's stable-phase step against lora-ft at the same "
                      "active rank (target <= 1.10x), mixed-batch generation (<= 1.05x the time), "
                      "consolidation (<= 1% of a task)",
    "llava_suite": "LLaVA-1.5-7B's shapes: CRAM's training step against LoRA at the same active rank "
                   "(target <= 1.10x), generation (<= 1.05x the time), the data path against pre-made "
                   "tensors (<= 1.05x); --tiny: a CPU smoke run",
    "feature_batch": "time per image of the tiny backbone's EfficientNet-Lite0 forward against the batch size",
    "gpu_suite": "the GPU half in one command (bench/gpu_suite.sh): adapter_layer and llava_suite at "
                 "LLaVA-1.5-7B's shapes, bf16",
    "gpu_e2e": "the command line end to end on a GPU at 7B shapes (random-weight LLaVA-1.5-7B and Qwen2-VL-7B "
               "checkpoints): run, SIGKILL mid-task, --resume, export; time and peak memory per phase; --tiny: CPU",
}


def listing() -> str:
    width = max(map(len, BENCHMARKS))
    lines = [__doc__.strip().splitlines()[0], ""]
    lines += [f"  {name:<{width}}  {what}" for name, what in BENCHMARKS.items()]
    lines += ["", "python -m bench NAME --help: a benchmark's flags; BENCHMARKS.md: what each measured"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(listing())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"python -m bench: unknown benchmark {name!r}\n\n{listing()}", file=sys.stderr)
        return 2
    if name == "gpu_suite":
        if rest[:1] in (["-h"], ["--help"]):
            print("usage: python -m bench gpu_suite   (OUT=DIR to choose the results folder; no flags)\n\n"
                  + BENCHMARKS[name])
            return 0
        return subprocess.call(["bash", str(HERE / "gpu_suite.sh"), *rest])
    script = HERE / f"{name}.py"
    sys.argv = [f"python -m bench {name}", *rest]
    sys.path.insert(0, str(HERE))  # the benchmarks' shared helpers (_timing.py, _e2e_*.py)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""bench/gpu_e2e.py's phases for one model, each its own process, and the record of them.

``run_model`` runs build, full, killed, resume and export as subprocesses of the entry script
(``gpu_e2e.py _child ...``, see ``_child``) through a ``Session``, which times each, keeps its log and peak
memory (the child's sampler thread; ``GpuSampler`` for nvidia-smi's reading), skips what would start past
``--budget-s``, and writes ``summary.json`` and ``summary.md`` (``markdown``) after every phase.
``wait_for_lock`` waits out a killed run's lock before ``--resume``; ``compare_runs`` compares the resumed run's
matrix, predictions and final method tensors with the uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _e2e_inputs import MODELS, TASKS, build_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENTRY = Path(__file__).resolve().with_name("gpu_e2e.py")  # each phase's process runs ``ENTRY _child ...``


# ------------------------------------------------------------------------------------------- phase processes
def _child(argv: list[str]) -> int:
    """``_child PEAK.json build KEY OUT [tiny]`` or ``_child PEAK.json cramcl ARGS...``: one phase, with a sampler
    thread writing its peak memory to PEAK.json every 0.25 s and at the end."""
    import resource

    import torch

    peak_file, kind, rest = Path(argv[0]), argv[1], argv[2:]
    extra: dict = {}

    def sample() -> None:
        rec = {"host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, **extra}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rec["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            rec["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        tmp = peak_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        tmp.replace(peak_file)

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.25):
            try:
                sample()
            except Exception:  # noqa: BLE001 - a sample is best effort; the final one is taken below
                pass

    threading.Thread(target=loop, daemon=True).start()
    try:
        if kind == "build":
            extra.update(build_checkpoint(rest[0], Path(rest[1]), tiny=rest[2:] == ["tiny"]))
            return 0
        from cramcl.cli import main
        return main(rest)
    finally:
        stop.set()
        sample()


class GpuSampler:
    """Peak of nvidia-smi's memory.used (MiB, GPU 0) while a phase runs: the whole process's footprint (CUDA
    context, allocator cache), beside the allocator's own peak."""

    def __init__(self):
        self.cmd = shutil.which("nvidia-smi")
        self.peak, self.stop, self.thread = None, threading.Event(), None

    def _read(self):
        try:
            out = subprocess.run([self.cmd, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10).stdout
            return int(out.split()[0])
        except Exception:  # noqa: BLE001 - no reading this time
            return None

    def __enter__(self):
        if self.cmd:
            def loop():
                while not self.stop.wait(0.5):
                    v = self._read()
                    if v is not None:
                        self.peak = max(self.peak or 0, v)
            self.thread = threading.Thread(target=loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread:
            self.thread.join()


class Session:
    def __init__(self, args):
        self.args, self.t0 = args, time.monotonic()
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="cramcl-gpu-e2e-", dir=args.workdir))
        self.summary: dict = {"tiny": args.tiny, "plan": {}, "models": {},
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "CRAMCL_MODELS": str(self.work / "models"),
                    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.env.pop("CRAMCL_KILL_AT", None)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def phase(self, model: str, name: str, child_args: list[str], env_extra: dict | None = None) -> dict:
        rec = {"phase": name}
        self.summary["models"][model]["phases"].append(rec)
        left = self.args.budget_s - self.elapsed()
        if left <= 0:
            rec.update(skipped=f"over the {self.args.budget_s:.0f} s budget")
            self.write()
            return rec
        peak = self.work / f"{model}-{name}.peak.json"
        log = self.out / "logs" / f"{model}-{name}.log"
        log.parent.mkdir(exist_ok=True)
        cmd = [sys.executable, str(ENTRY), "_child", str(peak), *child_args]
        print(f"[{self.elapsed():6.1f} s] {model} {name}: {' '.join(child_args)}", flush=True)
        t = time.perf_counter()
        with GpuSampler() as gpu, open(log, "w") as fh:
            try:
                rc = subprocess.run(cmd, env={**self.env, **(env_extra or {})}, cwd=ROOT, stdout=fh,
                                    stderr=subprocess.STDOUT, timeout=left + 60).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        rec.update(rc=rc, wall_s=round(time.perf_counter() - t, 2))
        if peak.is_file():
            rec.update({k: (round(v, 3) if isinstance(v, float) else v)
                        for k, v in json.loads(peak.read_text()).items()})
        if gpu.peak is not None:
            rec["nvidia_smi_peak_used_mib"] = gpu.peak
        print(f"[{self.elapsed():6.1f} s]   rc {rc}, {rec['wall_s']} s, "
              f"gpu peak {rec.get('gpu_peak_allocated_gib', '-')} GiB allocated, log {log}", flush=True)
        self.write()
        return rec

    def write(self) -> None:
        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        (self.out / "summary.md").write_text(markdown(self.summary))


def _model_dir_name(backbone_file: Path) -> str:
    import yaml

    path = yaml.safe_load(backbone_file.read_text())["backbone"]["model_path"]
    return Path(path).name


def wait_for_lock(run: Path, limit_s: float = 60.0) -> float | None:
    """Seconds until nothing holds ``run/run.lock`` any more (None: still held after ``limit_s``).

    SIGKILL ends the run's process, but DataLoader workers forked from it share its locked file description
    and hold the flock until they notice their parent is gone (PyTorch checks every 5 s): a ``--resume``
    started at once would be refused as "in use". A user waits too; the wait is recorded."""
    import fcntl

    lock, t = run / "run.lock", time.monotonic()
    while lock.is_file():
        with open(lock) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
        if time.monotonic() - t > limit_s:
            return None
        time.sleep(0.2)
    return round(time.monotonic() - t, 2)


def compare_runs(full: Path, resumed: Path) -> dict:
    """Matrix, predictions and final method tensors of the resumed run against the uninterrupted one."""
    from safetensors.torch import load_file

    out: dict = {}
    mf, mr = (d / "results" / "matrix.json" for d in (full, resumed))
    if not (mf.is_file() and mr.is_file()):
        return {"error": "a matrix.json is missing", "identical": False}
    out["matrix_equal"] = json.loads(mf.read_text())["scores"] == json.loads(mr.read_text())["scores"]
    out["final_matrix"] = json.loads(mr.read_text())["scores"]
    last = max((p for p in (full / "results" / "predictions").iterdir()), key=lambda p: int(p.name.split("_")[1]))
    files = sorted(p.name for p in last.iterdir())
    out["predictions_equal"] = all((resumed / "results" / "predictions" / last.name / f).is_file()
                                   and (last / f).read_bytes() ==
                                   (resumed / "results" / "predictions" / last.name / f).read_bytes() for f in files)
    ck = max((p for p in (full / "checkpoints").glob("task_*")), key=lambda p: int(p.name.split("_")[1]))
    tensors = [d / "checkpoints" / ck.name / "method.safetensors" for d in (full, resumed)]
    if not all(t.is_file() for t in tensors):
        out.update(tensors_bitwise_equal=False, identical=False, error=f"no {ck.name} checkpoint in both runs")
        return out
    a, b = (load_file(str(t)) for t in tensors)
    out["tensors_same_keys"] = set(a) == set(b)
    diffs = [float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a if k in b]
    out["tensors_max_abs_diff"] = max(diffs, default=0.0)
    out["tensors_bitwise_equal"] = out["tensors_same_keys"] and all(a[k].equal(b[k]) for k in a)
    out["identical"] = out["matrix_equal"] and out["predictions_equal"] and out["tensors_bitwise_equal"]
    return out


def _keep_results(run: Path, dest: Path) -> None:
    for rel in ("env.json", "config.yaml", "report.md", "results/matrix.json", "results/metrics.json"):
        if (run / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run / rel, dest / rel)


def run_model(s: Session, key: str, bench: Path) -> None:
    a, spec = s.args, MODELS[key]
    backbone_file = ROOT / spec["file"]
    model_dir = s.work / "models" / _model_dir_name(backbone_file)
    m = s.summary["models"][key] = {"backbone_file": spec["file"], "stands_for": spec["real"], "phases": []}
    build = s.phase(key, "build", ["build", key, str(model_dir), *(["tiny"] if a.tiny else [])])
    if build.get("rc") != 0:
        m["error"] = build.get("skipped") or "build failed"
        return
    m["checkpoint"] = {k: build.pop(k) for k in ("parameters", "dtype", "hidden", "layers", "vocab",
                                                  "bytes_on_disk", "init_s", "save_s") if k in build}
    kill_at = a.steps + a.kill_step  # inside task 1, after its a.kill_step-th optimizer step
    overrides = [f"train.steps_per_task={a.steps}", "train.epochs_per_task=null",
                 f"train.step_checkpoint_every={a.checkpoint_every}", "train.log_every=1",
                 f"backbone.max_new_tokens={a.new_tokens}", f"train.eval_batch_size={a.eval_batch}",
                 *a.extra]
    common = ["run", "--method", "cram", "--config", str(backbone_file), "--benchmark", str(bench)]
    runs = {n: s.work / "runs" / key / n for n in ("full", "killed")}
    m["command"] = " ".join(["cramcl", *common, "--out", "DIR", *overrides])
    full = s.phase(key, "full", ["cramcl", *common, "--out", str(runs["full"]), *overrides])
    killed = s.phase(key, "killed", ["cramcl", *common, "--out", str(runs["killed"]), *overrides],
                     {"CRAMCL_KILL_AT": f"train_step:{kill_at}"})
    killed["kill_at"] = f"train_step:{kill_at}"
    killed["killed_as_asked"] = killed.get("rc") == -9
    killed["lock_free_after_s"] = wait_for_lock(runs["killed"])
    resumed = s.phase(key, "resume", ["cramcl", "run", "--resume", "--out", str(runs["killed"])])
    log = s.out / "logs" / f"{key}-resume.log"
    hits = [ln.strip() for ln in log.read_text().splitlines() if "after optimizer step" in ln] if log.is_file() else []
    resumed["resumed_from"] = hits[0] if hits else None  # the runner's line naming the step checkpoint
    export_dir = s.work / "export" / key
    export = s.phase(key, "export", ["cramcl", "export", "--run", str(runs["killed"]), "--task", TASKS[0],
                                     "--format", "peft", str(export_dir)])
    files = sorted(p.name for p in export_dir.iterdir()) if export_dir.is_dir() else []
    export["files"] = files
    export["written"] = export.get("rc") == 0 and {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    if (export_dir / "adapter_config.json").is_file():
        cfg = json.loads((export_dir / "adapter_config.json").read_text())
        export["adapted_modules"] = len(cfg.get("target_modules") or [])
        shutil.copy2(export_dir / "adapter_config.json", s.out / f"{key}-adapter_config.json")
    for n, run in runs.items():
        _keep_results(run, s.out / "runs" / key / n)
        metrics = run / "results" / "metrics.json"
        if metrics.is_file():
            mj = json.loads(metrics.read_text())
            m[f"{n}_metrics"] = {k: mj.get(k) for k in ("time_s", "budget", "complete", "MAA", "BWT")}
    if full.get("rc") == 0 and resumed.get("rc") == 0:
        m["resume"] = compare_runs(runs["full"], runs["killed"])
    else:
        m["resume"] = {"identical": False, "error": "the full or the resumed run failed"}
    s.write()
    if not a.keep:
        shutil.rmtree(model_dir, ignore_errors=True)  # 14-17 GB each at full size


# ---------------------------------------------------------------------------------------------------- report
def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _gib(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else "-"


def markdown(summary: dict) -> str:
    lines = [f"# cramcl end to end ({'tiny, CPU' if summary['tiny'] else '7B shapes'})", "",
             f"started {summary['started']}, {summary.get('elapsed_s', 0)} s in all; device: "
             f"{summary['plan'].get('device', '?')}", ""]
    for key, m in summary["models"].items():
        ck = m.get("checkpoint", {})
        lines += [f"## {key} ({m['stands_for']} shapes, `{m['backbone_file']}`)", "",
                  f"{_count(ck.get('parameters', 0))} parameters, hidden {ck.get('hidden')}, "
                  f"{ck.get('layers')} layers, vocab {ck.get('vocab')}, {ck.get('dtype')}, "
                  f"{ck.get('bytes_on_disk', 0) / 2**30:.1f} GiB on disk", "",
                  "| phase | rc | wall s | GPU peak allocated GiB | GPU peak reserved GiB | nvidia-smi peak MiB | "
                  "host peak RSS GiB |", "|---|---|---|---|---|---|---|"]
        for p in m["phases"]:
            if "skipped" in p:
                lines.append(f"| {p['phase']} | skipped: {p['skipped']} | | | | | |")
                continue
            lines.append(f"| {p['phase']} | {p.get('rc')} | {p.get('wall_s')} | "
                         f"{_gib(p.get('gpu_peak_allocated_gib'))} | {_gib(p.get('gpu_peak_reserved_gib'))} | "
                         f"{p.get('nvidia_smi_peak_used_mib', '-')} | {_gib(p.get('host_peak_rss_gib'))} |")
        r = m.get("resume", {})
        if r:
            lines += ["", f"resume: identical {r.get('identical')} (matrix {r.get('matrix_equal')}, predictions "
                          f"{r.get('predictions_equal')}, method tensors bitwise {r.get('tensors_bitwise_equal')}, "
                          f"max abs diff {r.get('tensors_max_abs_diff')}); final matrix {r.get('final_matrix')}"]
        for run in ("full", "killed"):
            t = (m.get(f"{run}_metrics") or {}).get("time_s") or {}
            if t:
                lines.append(f"{'uninterrupted' if run == 'full' else 'killed + resumed'} run (metrics.json): "
                             f"train {t.get('train_per_task')} s, eval {t.get('eval_per_task')} s per task")
        exp = next((p for p in m["phases"] if p["phase"] == "export"), {})
        if "written" in exp:
            lines.append(f"export: written {exp['written']} ({', '.join(exp.get('files', []))}; "
                         f"{exp.get('adapted_modules', '?')} modules)")
        lines.append("")
    return "\n".join(lines) + "\n"

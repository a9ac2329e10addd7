"""The whole command line end to end at 7B shapes, one short script for a lent GPU (or ``--tiny`` on a CPU).

For each model (LLaVA-1.5-7B, Qwen2-VL-7B-Instruct shapes; random weights, nothing downloaded):

build     a random-weight checkpoint of the real config's sizes in bf16, written with ``save_pretrained`` into
          a temporary ``$CRAMCL_MODELS/<name>`` (the directory the repository's backbone file names), with an
          offline tokenizer and processor: the tiny builders of ``cramcl.backbones.hf.tiny_models`` give the
          architecture's config, special tokens, chat template and processor; this script overrides their
          sizes (``FULL``) and image processor, and never edits them.
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
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("shape", "colour", "count")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")

# key -> the tiny builder's architecture, the repository's backbone file, the real checkpoint it stands for
MODELS = {
    "llava": {"arch": "llava", "file": "configs/backbones/llava-1.5-7b.yaml", "real": "llava-hf/llava-1.5-7b-hf"},
    "qwen2_vl": {"arch": "qwen2_vl", "file": "configs/backbones/qwen2-vl-7b.yaml",
                 "real": "Qwen/Qwen2-VL-7B-Instruct"},
}

# The real checkpoints' config.json sizes, written over the tiny builders' configs (text, vision, top level).
FULL = {
    "llava": {  # CLIP ViT-L/14-336 + Vicuna-7B (Llama): 7.06 B parameters, 576 image tokens
        "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, head_dim=128, vocab_size=32064, max_position_embeddings=4096,
                     rms_norm_eps=1e-5),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768),
        "top": dict(image_seq_length=576),
    },
    "qwen2_vl": {  # a 675 M ViT (patch 14, 2x2 merge) + Qwen2-7B: 8.29 B parameters
        "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     layer_types=["full_attention"] * 28, max_window_layers=28,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        "vision": dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2),
        "top": {},
    },
}
# --tiny: the builders' own sizes (hidden 64, 2 layers, 32 px); the override path runs all the same
TINY = {"llava": {"text": {}, "vision": {}, "top": {}}, "qwen2_vl": {"text": {}, "vision": {}, "top": {}}}


# ----------------------------------------------------------------------------------------------- checkpoints
def _processor_at_full_size(arch: str, processor) -> None:
    """The real checkpoints' image processing (336 px CLIP crop; Qwen2-VL's patch 14, 2x2 merge, its pixel range)."""
    import transformers as tf

    if arch == "llava":
        processor.image_processor = tf.CLIPImageProcessor(size={"shortest_edge": 336},
                                                          crop_size={"height": 336, "width": 336})
        processor.patch_size = 14
    else:
        sizes = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56,
                     max_pixels=28 * 28 * 16384)
        processor.image_processor = tf.Qwen2VLImageProcessor(**sizes)
        if getattr(processor, "video_processor", None) is not None:
            processor.video_processor = tf.Qwen2VLVideoProcessor(**sizes)


def model_config(key: str, tiny: bool):
    """(model class, config, tokenizer, processor) of ``key`` at full (or tiny) size: the tiny builder's, with
    the sizes of ``FULL`` written over its config (nothing is instantiated at full size here)."""
    import logging

    import torch

    from cramcl.backbones.hf import tiny_models
    from cramcl.backbones.hf.tiny_tokenizers import build_tokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    arch, sizes = MODELS[key]["arch"], (TINY if tiny else FULL)[key]
    torch.manual_seed(0)
    tok = build_tokenizer(arch)
    small, processor = tiny_models._build(arch, tok, 64, 2)  # the architecture's config, ids and processor
    d = small.config.to_dict()
    d["text_config"].update(sizes["text"])
    d["vision_config"].update(sizes["vision"])
    d.update(sizes["top"])
    if not tiny:
        _processor_at_full_size(arch, processor)
    return type(small), type(small.config).from_dict(d), tok, processor


def build_checkpoint(key: str, out: Path, tiny: bool) -> dict:
    """Build ``key``'s model at full (or tiny) size with random weights and ``save_pretrained`` it into ``out``."""
    import torch
    from transformers import GenerationConfig

    from cramcl.backbones.hf import tiny_models
    from cramcl.backbones.hf.tiny_tokenizers import generation_stop_ids

    cls, config, tok, processor = model_config(key, tiny)
    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    t0 = time.perf_counter()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(torch.float32)
    init_s = time.perf_counter() - t0
    stops = generation_stop_ids(MODELS[key]["arch"], tok)  # as build_tiny_model sets it
    model.generation_config = GenerationConfig(eos_token_id=stops if len(stops) > 1 else stops[0],
                                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                               do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    tiny_models.save_processor(processor, out)
    t0 = time.perf_counter()
    model.save_pretrained(out)
    text = config.get_text_config()
    return {"parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).removeprefix("torch."),
            "device": device, "init_s": round(init_s, 2), "save_s": round(time.perf_counter() - t0, 2),
            "hidden": text.hidden_size, "layers": text.num_hidden_layers, "vocab": text.vocab_size,
            "bytes_on_disk": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}


# ----------------------------------------------------------------------------------------------------- stream
def _draw(task: str, i: int, size: int):
    """(image, question, answer) number i of ``task``: one drawn shape, colour or count of dots."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(im)
    s = size / 32  # drawn on a 32-unit grid, scaled to the image
    names = list(COLOURS)
    if task == "shape":
        shape = SHAPES[i % 3]
        box = [int(v * s) for v in (6 + i % 3, 6, 26, 26 - i % 4)]
        fill = COLOURS[names[i % 4]]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
        return im, "What shape is in the image? Answer with one word.", shape
    if task == "colour":
        colour = names[i % 4]
        draw.rectangle([int(v * s) for v in (4 + i % 5, 5, 27, 28 - i % 3)], fill=COLOURS[colour])
        return im, "What colour is the shape? Answer with one word.", colour
    n = 1 + i % 5
    for k in range(n):
        x, y = 4 + (k * 11 + i) % 22, 4 + (k * 7 + 3 * i) % 22
        draw.ellipse([int(x * s), int(y * s), int((x + 4) * s), int((y + 4) * s)], fill=(255, 255, 255))
    return im, "How many dots are there? Answer with a number.", str(n)


def write_stream(root: Path, n_train: int, n_test: int, size: int) -> Path:
    """A 3-task benchmark under ``root``: bench.yaml, <task>/{train,test}.jsonl, images/<task>/*.png."""
    lines = ["name: gpu-e2e", "image_root: images", "tasks:"]
    for task in TASKS:
        (root / "images" / task).mkdir(parents=True, exist_ok=True)
        (root / task).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n_train + n_test):
            im, question, answer = _draw(task, i, size)
            im.save(root / "images" / task / f"{i}.png")
            rows.append({"id": f"{task}-{i}", "image": f"{task}/{i}.png", "question": question, "answer": answer})
        for split, part in (("train", rows[:n_train]), ("test", rows[n_train:])):
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        scorer = "number" if task == "count" else "exact"
        lines.append(f"  - {{name: {task}, train: {task}/train.jsonl, test: {task}/test.jsonl, scorer: {scorer}}}")
    (root / "bench.yaml").write_text("\n".join(lines) + "\n")
    return root / "bench.yaml"


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
        cmd = [sys.executable, str(Path(__file__).resolve()), "_child", str(peak), *child_args]
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

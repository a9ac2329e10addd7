"""Step checkpoints: the task in progress, every ``train.step_checkpoint_every`` optimizer steps, so that an
interrupted task continues where it was instead of from step 0.

``checkpoints/step/`` holds at most one (the newest) and is deleted once the task's own checkpoint lands:

    method.safetensors / method.json     method.state() as it stands mid-task (adapters, buffer, centroids ...)
    trainer.safetensors                  ``phase.*``: method.phase_state() tensors (statistics gathered during
                                         the task, e.g. CRAM's c_buf sums); ``optim.<i>.<name>``: the current
                                         phase's optimizer state; ``rng.torch`` / ``rng.cuda.<d>``: RNG states
    trainer.json                         task, optimizer steps done, phase index, counters, the optimizer's
                                         param groups, python's RNG state, method.phase_state() metadata
    manifest.json                        written last (engine/checkpoint.py: same atomic write and checks)

The learning rate follows from the step index (trainer.lr_factor) and the data order from the seed
(trainer.global_batches), so the step index is their whole position. Resuming = the runner restores the
last task checkpoint, runs ``before_task`` as usual, then overlays this state (``load_state`` +
``load_phase_state``); the trainer skips the phases already finished, calls ``begin_phase`` for the current
one (which sets the trainable set), loads the optimizer state and, right before the next batch, the RNG
states. Only methods with ``mid_task_resume = True`` get step checkpoints (their phase_state() holds every
mid-task statistic); the others resume from the task checkpoint as before.

With several processes the main process writes it and every process restores its RNG states: the processes
are seeded alike and draw alike, so they hold the same states (mid-task resume is tested on one process).
"""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cramcl.engine.checkpoint import UnusableCheckpoint, read_checkpoint_files, write_checkpoint_dir

STEP_DIR = "step"
STEP_FILES = ("method.safetensors", "method.json", "trainer.safetensors", "trainer.json")
STEP_FORMAT = "cramcl-step-checkpoint/1"


@dataclass
class StepResume:
    """What a step checkpoint restores; ``step``: optimizer steps of task ``task`` already done."""
    task: int
    step: int
    phase_index: int
    method_tensors: dict
    method_meta: dict
    trainer_tensors: dict
    trainer_meta: dict = field(default_factory=dict)

    def prefixed(self, prefix: str) -> dict:
        """The trainer tensors under ``prefix`` (e.g. ``"phase."``), with the prefix removed."""
        return {k[len(prefix):]: v for k, v in self.trainer_tensors.items() if k.startswith(prefix)}


# ------------------------------------------------------------------ optimizer state <-> tensors + JSON
def flatten_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    """An optimizer ``state_dict()`` as (tensors ``optim.<param>.<name>``, JSON meta): safetensors holds the
    tensors (AdamW: step, exp_avg, exp_avg_sq), JSON the param groups and any non-tensor per-param value."""
    tensors, scalars = {}, {}
    for param, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{param}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict, meta: dict) -> dict:
    """Inverse of :func:`flatten_optimizer_state` (``tensors`` may hold other prefixes; they are ignored)."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, param, name = key.split(".", 2)
            state.setdefault(int(param), {})[name] = value
    for param, values in meta.get("scalars", {}).items():
        state.setdefault(int(param), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------ RNG states
def capture_rng() -> tuple[dict, dict]:
    """(tensors, JSON) of every RNG a training step may draw from: torch CPU, each CUDA device (when CUDA is
    initialised) and python's ``random``. numpy's global RNG is not used by training, so it is not saved."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{d}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python_random": [version, list(internal), gauss]}


def restore_rng(tensors: dict, meta: dict) -> None:
    """Set the RNG states saved by :func:`capture_rng` (CUDA ones when the device count matches)."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))


# ------------------------------------------------------------------ files
def step_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / STEP_DIR


def save_step_checkpoint(run_dir: Path, task: int, step: int, method_state: tuple[dict, dict],
                         trainer_tensors: dict, trainer_meta: dict) -> Path:
    """Write (atomically, replacing the previous one) the step checkpoint of ``task`` after ``step`` steps."""
    tensors, meta = method_state
    return write_checkpoint_dir(Path(run_dir) / "checkpoints", STEP_DIR,
                                {"method.safetensors": tensors, "trainer.safetensors": trainer_tensors},
                                {"method.json": meta, "trainer.json": {**trainer_meta, "task": task, "step": step}},
                                {"format": STEP_FORMAT, "task": task, "step": step},
                                kill_name="step_checkpoint_write")


def remove_step_checkpoint(run_dir: Path) -> None:
    """Delete the step checkpoint (the task it belongs to has its own checkpoint now)."""
    shutil.rmtree(step_dir(run_dir), ignore_errors=True)


def read_step_checkpoint(run_dir: Path, task: int, warn=print) -> StepResume | None:
    """The step checkpoint of ``task`` when there is a usable one. One that belongs to another task (older
    than the last task checkpoint, or beyond a damaged one) or that does not match its manifest is reported
    through ``warn`` and ignored: the task then restarts from its first step, as without step checkpoints."""
    path = step_dir(run_dir)
    if not path.is_dir():
        return None
    problem = None
    try:  # read once: the manifest check, the parse and the finite check in one pass over the files
        files = read_checkpoint_files(path, STEP_FILES, STEP_FORMAT)
        meta = files["trainer.json"]
        found = (int(meta["task"]), int(meta["step"]), int(meta["phase_index"]))
        resume = StepResume(*found, files["method.safetensors"], files["method.json"],
                            files["trainer.safetensors"], meta)
    except UnusableCheckpoint as e:
        problem = e.problem
    except (KeyError, TypeError, ValueError) as e:  # whole and finite, yet not a step checkpoint's contents
        problem = f"{path}: does not parse ({type(e).__name__}: {e})"
    if problem is not None:
        warn(f"warning: step checkpoint not usable ({problem}); task {task} restarts from its first step")
        return None
    if resume.task != task:
        warn(f"note: step checkpoint of task {resume.task} ignored (the run continues with task {task})")
        return None
    return resume

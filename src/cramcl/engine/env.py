"""The Accelerator of a run and the environment record (env.json)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

# No network at run time: a wrong model path fails fast instead of hanging on a hub request. Set before the
# imports below, which read these variables when they are first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import accelerate  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration  # noqa: E402

import cramcl  # noqa: E402
from cramcl.engine.budget import global_batch  # noqa: E402


def make_accelerator(cfg, out: Path):
    return Accelerator(
        # without a GPU, several processes (torchrun) form a gloo process group on the CPU
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        # the sampler yields *global* batches; each process takes its slice, so the sequence of optimizer
        # steps is the same for any number of processes at the same global batch size
        # non_blocking: pinned batches (engine/loader.py) are copied to the GPU while it computes
        dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=torch.cuda.is_available()),
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


def installed_packages() -> list[str]:
    """Every installed distribution as ``name==version``, sorted (what ``pip freeze`` would list)."""
    return sorted({f"{d.metadata['Name']}=={d.version}" for d in distributions() if d.metadata["Name"]},
                  key=str.lower)


def git_commit() -> str | None:
    """The commit of the cramcl source tree when it is a git checkout (an editable install), else None; a
    '+dirty' suffix when it has uncommitted changes."""
    src = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def environment_record(cfg, accelerator, backbone, bench) -> dict:
    import peft  # only for its version here; seconds to import, so eval, predict and inspect skip it

    if accelerator.is_main_process:
        accelerator.init_trackers("cramcl", config={"method": cfg.method, "profile": cfg.profile, "seed": cfg.seed})
    return {
        "cramcl": cramcl.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__, "peft": peft.__version__,
                     "safetensors": safetensors.__version__, "tokenizers": tokenizers.__version__},
        "device": str(accelerator.device),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "world_size": accelerator.num_processes,
        # FSDP2 on the frozen base (engine/sharding.py), or null: data-parallel (DDP) or one process
        "sharding": backbone.shards.describe() if getattr(backbone, "shards", None) is not None else None,
        "per_device_batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "global_batch_size": global_batch(cfg.train, accelerator.num_processes),
        "epochs_per_task": cfg.train.epochs_per_task,  # null: a fixed train.steps_per_task
        "mixed_precision": cfg.train.mixed_precision,
        "torch_threads": torch.get_num_threads(),
        "benchmark": {"name": bench.name, "path": str(bench.path), "tasks": bench.task_names()},
        "backbone": backbone.describe(),
        "git_commit": git_commit(),
        "packages": installed_packages(),
    }

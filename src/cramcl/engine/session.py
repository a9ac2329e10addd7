"""Everything a run needs in memory (stream, accelerator, backbone, method), built one way for
``cramcl run``, ``cramcl eval`` and ``cramcl inspect``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import DistributedType

import cramcl.backbones  # build_backbone looked up when called: a test may replace it
from cramcl.config import RunConfig
from cramcl.data.stream import check_stream_images, load_stream
from cramcl.engine.checkpoint import TaskCheckpoint, checkpoint_for_reading, read_checkpoint
from cramcl.engine.env import make_accelerator
from cramcl.engine.loader import resolve_workers
from cramcl.engine.sharding import shard_frozen_base, take_over_fsdp_request
from cramcl.engine.run_record import RunRecord
from cramcl.engine.saved_config import load_saved_config
from cramcl.errors import BadInputError
from cramcl.methods.base import Services
from cramcl.methods.registry import build_method
from cramcl.utils.progress import set_interval


@dataclass
class Session:
    cfg: RunConfig
    bench: object
    accelerator: object
    backbone: object
    method: object

    @property
    def loader_workers(self) -> int:
        """``train.loader_workers`` resolved for this backbone and this machine's CPUs per local process."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        return resolve_workers(self.cfg.train.loader_workers, self.backbone, local)


def open_session(cfg: RunConfig, out: Path, log=print, check_images: bool = False) -> Session:
    """``check_images``: decode every image of the stream first (``cramcl run``, unless data.validate_images
    is off), so a bad one is reported before anything trains."""
    set_interval(cfg.train.progress_seconds)
    bench = load_stream(cfg.data)
    if check_images:
        check_stream_images(bench)
    fsdp = take_over_fsdp_request()  # before the Accelerator: cramcl shards the frozen base itself (engine/sharding.py)
    accelerator = make_accelerator(cfg, out)
    torch.manual_seed(cfg.seed)
    with accelerator.main_process_first():  # one process trains/caches the base stage, the others load it
        backbone = cramcl.backbones.build_backbone(cfg, bench, log=log)
    torch.manual_seed(cfg.seed)  # the method's fresh weights never depend on whether the base stage was cached
    method = build_method(cfg.method, cfg.method_args)
    method.setup(Services(backbone=backbone, run_config=cfg, log=log))
    backbone.model.to(accelerator.device)
    backbone.shards = None
    if fsdp and accelerator.num_processes > 1:
        backbone.shards = shard_frozen_base(backbone.model, accelerator)
        log(f"FSDP2: the frozen base is {len(backbone.shards.units)} units sharded over {accelerator.num_processes} "
            "processes while training; adapters and centroids replicated")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        log("WARNING: DeepSpeed has not been run with cramcl (its engine steps inside backward and ZeRO keeps one "
            "partition of the optimizer per process, which step checkpoints do not gather); configs/accelerate/"
            "fsdp.yaml is the tested sharded launch "
            "(docs/real-models.md, \"Sharded training (FSDP2 on the frozen base)\")")
    return Session(cfg, bench, accelerator, backbone, method)


def open_finished_run(run_dir: Path, after_task: int | None = None, log=print) -> tuple[Session, int, RunRecord]:
    """A session with the method state of ``checkpoints/task_<after_task>`` (default: the last one), which is
    checked before anything is built: a damaged one, or one holding a non-finite tensor, is bad input."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise BadInputError(f"{run_dir / 'config.yaml'}: not found; --run must be the directory of a cramcl run")
    cfg = load_saved_config(run_dir)
    ckpt = checkpoint_for_reading(run_dir, after_task)
    session = open_session(cfg, run_dir, log=log)
    return session, *restore_checkpoint(session, ckpt)


def restore_checkpoint(session: Session, ckpt: Path | TaskCheckpoint) -> tuple[int, RunRecord]:
    """Load ``checkpoints/task_<t>`` (a path, or the checkpoint already read) into the session's method;
    returns (t, the run's record saved with it)."""
    if not isinstance(ckpt, TaskCheckpoint):
        ckpt = read_checkpoint(Path(ckpt))
    session.method.load_state(ckpt.tensors, ckpt.meta)
    session.backbone.model.to(session.accelerator.device)
    return ckpt.task, RunRecord.from_json(ckpt.runner)

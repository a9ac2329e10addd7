"""The trainer does no host work per optimizer step under train.nonfinite=stop: it reads a device value
(``.item()``, ``bool()``, ``float()``, ``.tolist()``, ...) only when it logs, at a phase's end and before a
checkpoint. Counted by wrapping those Tensor methods and keeping the calls made from the trainer's own code
(engine/trainer.py, utils/progress.py); what a method's own compute_loss reads is the method's business."""
from __future__ import annotations

import sys

import torch

from conftest import LogSink, quick_config

torch.set_num_threads(1)
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
TRAINER_FILES = ("cramcl/engine/trainer.py", "cramcl/utils/progress.py")


def _count_trainer_reads(monkeypatch, run) -> int:
    calls = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if caller.endswith(TRAINER_FILES):
                calls.append(caller)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    try:
        run()
    finally:
        monkeypatch.undo()
    return len(calls)


def _train(tmp_path, steps: int, nonfinite: str):
    from cramcl.engine.session import open_session
    from cramcl.engine.trainer import train_task

    # log_every beyond the task and no step checkpoints: the only reads left are the end-of-task log and the
    # end-of-phase check
    cfg = quick_config(extra=[f"train.steps_per_task={steps}", "train.log_every=1000",
                              "train.step_checkpoint_every=0", f"train.nonfinite={nonfinite}"])
    session = open_session(cfg, tmp_path / f"{steps}-{nonfinite}", log=LogSink())
    task = session.bench.tasks[0]
    torch.manual_seed(0)
    session.method.before_task(0, task)
    return lambda: train_task(session.accelerator, session.backbone, session.method, list(task.train), cfg.train,
                              0, seed=0, task_name=task.name)


def test_stop_mode_reads_the_device_only_when_logging_and_at_the_phase_end(tmp_path, monkeypatch, warm_cache):
    short = _count_trainer_reads(monkeypatch, _train(tmp_path, 2, "stop"))
    long = _count_trainer_reads(monkeypatch, _train(tmp_path, 8, "stop"))
    assert long == short <= 3, (short, long)  # the final log (check + loss) and the phase-end check


def test_skip_mode_reads_one_flag_per_step(tmp_path, monkeypatch, warm_cache):
    """The documented exception (it must know before optimizer.step()), and the proof that the counter sees
    the trainer's reads at all."""
    short = _count_trainer_reads(monkeypatch, _train(tmp_path, 2, "skip"))
    long = _count_trainer_reads(monkeypatch, _train(tmp_path, 8, "skip"))
    assert long - short == 6


def test_a_non_finite_step_is_named_by_its_first_bad_step(tmp_path, warm_cache):
    """Read late, the error still names the first non-finite step (not the step where it was read)."""
    from cramcl.engine.trainer import NonFiniteWatch

    watch = NonFiniteWatch("cpu")
    for step, loss, norm in ((1, 1.0, 1.0), (2, 1.0, float("inf")), (3, float("nan"), 1.0)):
        watch.note_loss(torch.tensor(loss))
        watch.note_step(step, torch.tensor(norm))
    assert watch.first_bad() == (2, "the gradient norm")
    watch = NonFiniteWatch("cpu")
    watch.note_loss(torch.tensor(float("nan")))
    watch.note_loss(torch.tensor(1.0))  # a later micro-batch of the same step does not clear it
    watch.note_step(1, None)
    assert watch.first_bad() == (1, "the loss")

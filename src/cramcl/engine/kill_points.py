"""Named points where a fault-injection test may kill the process (SIGKILL, no cleanup), to prove that
``--resume`` recovers from an interruption anywhere. Inert unless ``CRAMCL_KILL_AT`` is set:

    CRAMCL_KILL_AT=checkpoint_write      # the first time the point is reached
    CRAMCL_KILL_AT=train_step:8          # the 8th time
    CRAMCL_KILL_SIGNAL=SIGTERM           # send this signal instead of SIGKILL (a test of the SIGTERM path
                                         # that does not race the run: the signal lands at a known point)

Points: task_start, train_step, eval_batch, checkpoint_write (tensors written, manifest not yet),
checkpoint_done, results_write (matrix.json written, metrics.json not yet), step_checkpoint_write (a step
checkpoint's files written, its manifest not yet), step_checkpoint_done (right after a step checkpoint).
"""
from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def kill_point(name: str) -> None:
    target = os.environ.get("CRAMCL_KILL_AT")
    if not target:
        return
    point, _, nth = target.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), getattr(signal, os.environ.get("CRAMCL_KILL_SIGNAL", "SIGKILL")))

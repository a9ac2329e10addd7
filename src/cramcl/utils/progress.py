"""Progress bars that stay readable in a log file: on a terminal tqdm redraws as usual; when stderr is not a
terminal (a log, a batch job), a bar writes at most one update every ``interval`` seconds
(``train.progress_seconds``, 30 by default) instead of one per step."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

_interval = 30.0


def set_interval(seconds: float) -> None:
    """Seconds between two updates of a bar when stderr is not a terminal (from train.progress_seconds)."""
    global _interval
    _interval = max(0.1, float(seconds))


def bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` with the update rate of the output it writes to."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", _interval)
        kwargs.setdefault("maxinterval", max(_interval, 10.0))
    return tqdm(iterable, **kwargs)


def due(b: tqdm) -> bool:
    """Whether ``b`` redraws at its next update (its minimum interval has passed): the moment to read values
    that cost a device sync (the loss) for its postfix, instead of reading them every step."""
    return not b.disable and time.time() - b.last_print_t >= b.mininterval

"""Faults the machine causes, not the program: a full disk, a run directory removed while a run writes in it.
They are reported in one line naming the file (exit 1), never with a traceback; an internal error keeps its."""
from __future__ import annotations

import errno
import os
import re
import threading
from pathlib import Path


#: errors of the disk or filesystem, not of the program: one line naming the file, never a traceback
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: itself, one it was raised from, or a library's wrapper that names only the
    error number (safetensors: "... (os error 28)")."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        number = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
        if number:
            code = int(number.group(1))
            return OSError(code, os.strerror(code))
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def environment_fault(error: BaseException, out: str | None, resume_hint: str) -> str | None:
    """One line for an OSError the machine caused (a full disk, a run directory removed while a run writes
    in it), or None for any other (an internal error, reported with its traceback). ``out``: the run (or
    compare) directory being written, None for other commands; ``resume_hint``: how to continue."""
    e = os_error(error)
    if e is None:
        return None
    where = os.fsdecode(e.filename) if e.filename else ""
    where = where or (out or "")
    what = f"{where}: {e.strerror or e} [errno {e.errno}]" if where else f"{e.strerror or e} [errno {e.errno}]"
    if e.errno in DISK_ERRNOS:
        return f"{what}; free space (or fix the disk), then {resume_hint}"
    # a file of the run's own directory vanished under it: the directory (or part of it) was removed or moved
    if out and where and e.errno in (errno.ENOENT, errno.ENOTDIR) \
            and Path(os.path.abspath(where)).is_relative_to(os.path.abspath(out)):
        return f"{what}; the run directory {out} (or part of it) was removed or moved while the run wrote to it"
    return None


#: disk faults met by a library's writer thread (TensorBoard's event writer) while the command ran
BACKGROUND_FAULTS: list[str] = []


def background_thread_fault(hook_args) -> None:
    """A library's writer thread hit by a disk fault (the run directory removed, a full disk): kept for one
    warning line at the end, or left to the run's own fault line; any other thread error keeps Python's report."""
    e = os_error(hook_args.exc_value) if hook_args.exc_value is not None else None
    if e is None or e.errno not in (*DISK_ERRNOS, errno.ENOENT, errno.ENOTDIR):
        threading.__excepthook__(hook_args)
        return
    where = f"{os.fsdecode(e.filename)}: " if e.filename else ""
    name = type(hook_args.thread).__name__ if hook_args.thread is not None else "a background thread"
    BACKGROUND_FAULTS.append(f"{name} stopped writing: {where}{e.strerror or e} [errno {e.errno}]")

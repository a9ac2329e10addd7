"""One writer per run directory: ``DIR/run.lock``.

A writer (``cramcl run``, ``run --resume``, ``run --seeds``, ``compare``) holds the lock for its whole life,
through :func:`hold_run_lock`; a second writer on the same directory is refused (bad input, exit 2) before it
touches anything, with one line naming the holder.

How it works:

- The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``DIR/run.lock``. The kernel (or the NFS server, which
  Linux maps ``flock`` onto) drops it when the holding process ends in any way, SIGKILL included, so a killed
  run never blocks the next one.
- The file holds JSON naming the holder: ``pid``, ``host``, ``boot_id``, ``started`` (local time) and
  ``started_unix``, ``command`` (e.g. ``cramcl run --resume``) and the full ``argv``; a refusal quotes it.
- A clean exit (normal, exception, exit 2, Ctrl-C, SIGTERM through the CLI) deletes the file before letting go
  of the lock, so a file that is still there when the lock is free was left by a process that died: it is
  stale, logged once with whose it was, and taken over. After taking the lock the file's inode is compared
  with the path's, so a process that opened the file just before its holder deleted it retries on the new
  one instead of locking a deleted file.
- Filesystems without ``flock`` (it fails with ENOLCK, EOPNOTSUPP, ENOSYS or EINVAL: some FUSE, SMB or Lustre
  mounts): the file is created with ``O_EXCL`` instead and a leftover one is stale when its host is this one
  and its pid no longer exists or the machine has rebooted since (another ``boot_id``). A holder on another
  host cannot be checked from here: it is honoured, and the refusal says to delete the file if that process
  is gone. Two writers starting in the same instant may both pass there. Filesystems whose ``flock`` is local
  to each host (Lustre ``localflock``) exclude writers on one host only.
- Several processes of one run (torchrun, Accelerate): only the main process (rank 0) takes the lock; the
  others never look at it.
- Within one process the lock is re-entrant (``compare`` holds each method's directory and the runner takes
  it again).

Readers (``eval``, ``predict``, ``inspect``, ``export``) never lock: :func:`reader_note` only reads the file,
so a reader can never block or refuse a writer. A run in progress is read at its last finished task
checkpoint, which is complete once its manifest is written.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from cramcl.errors import BadInputError

try:
    import fcntl
except ImportError:  # not a POSIX system: the O_EXCL fallback below
    fcntl = None

LOCK_NAME = "run.lock"
FORMAT = "cramcl-run-lock/1"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_UNWRITTEN_STALE_S = 60  # fallback only: an empty lock file older than this was left by a writer that died
_held: dict[str, list] = {}  # resolved lock path -> [RunLock, depth], the locks this process holds
_held_guard = threading.Lock()


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def is_main_process() -> bool:
    """Rank 0 of a multi-process launch (torchrun, Accelerate, MPI), or a single process. Read from the
    launcher's environment, so nothing of the process group has to exist yet."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"):
        value = os.environ.get(var, "").strip()
        if value:
            return value == "0"
    return True


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _command() -> str:
    """``cramcl run --resume`` for the command line, ``python <script>`` for a program using the API."""
    argv = list(sys.argv)
    first = Path(argv[0]).name if argv else "python"
    if first == "cramcl" or (argv and Path(argv[0]).parent.name == "cramcl" and first == "__main__.py"):
        words = ["cramcl", *argv[1:2]]
        return " ".join(words + (["--resume"] if "--resume" in argv[2:] else []))
    return f"python {first}"


def holder_record() -> dict:
    now = time.time()
    return {"format": FORMAT, "pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)), "started_unix": round(now, 3),
            "command": _command(), "argv": " ".join(sys.argv)[:2000]}


def describe(holder: dict | None) -> str:
    """``cramcl run (pid 1234 on host, since 2026-12-07 21:00:00)``."""
    if not holder:
        return "another cramcl process (it has not written its details yet)"
    return (f"{holder.get('command', 'a cramcl process')} (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {holder.get('started', '?')})")


def _parse(text: str) -> dict | None:
    try:
        found = json.loads(text)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def read_holder(run_dir: Path) -> dict | None:
    """The holder recorded in ``DIR/run.lock`` (None: no file, or nothing readable in it). Reads only."""
    try:
        return _parse(lock_path(run_dir).read_text(errors="replace"))
    except OSError:
        return None


def holder_alive(holder: dict) -> bool:
    """Whether the recorded holder may still run: its pid exists on this host since the same boot; a holder
    on another host is assumed alive (it cannot be checked from here)."""
    if holder.get("host") != socket.gethostname():
        return True
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return False
    return True


def _stale_line(run_dir: Path, holder: dict | None) -> str:
    whose = describe(holder) if holder else "a cramcl process that had not written its details"
    return f"note: {run_dir}: took over a stale lock ({LOCK_NAME}) left by {whose}, which ended without releasing it"


def _refusal(run_dir: Path, holder: dict | None, hint_delete: bool) -> BadInputError:
    line = f"{run_dir} is in use by {describe(holder)}; wait for it or stop it"
    if hint_delete:
        line += f" (if that process is gone, delete {lock_path(run_dir)})"
    return BadInputError(line)


def refuse_if_held(run_dir: Path) -> None:
    """Refuse when another process holds ``DIR/run.lock``, changing nothing there (no file is created): a
    second writer names the holder before any other check of the directory, which the holder may be writing.
    A writer's probe, never a reader's: it locks for an instant when the lock is free."""
    path = lock_path(Path(run_dir))
    if not is_main_process() or str(path.resolve()) in _held:
        return
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return  # no lock file (or none we could take anyway: acquire says why)
    try:
        holder = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no flock")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refusal(Path(run_dir), holder, hint_delete=False) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            if holder is not None and holder_alive(holder):
                raise _refusal(Path(run_dir), holder, hint_delete=True) from None
    finally:
        os.close(fd)  # also lets go of the probe's lock


_HELD_FDS: set[int] = set()  # this process's locked descriptors (closed in forked workers: drop_inherited_locks)


def drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the run lock's descriptors it inherited. A ``flock`` lasts
    until every descriptor of its open file is closed, so a worker that outlives a killed run would otherwise
    hold the run's lock for the seconds it takes to notice, and refuse the ``--resume`` started meanwhile."""
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


class RunLock:
    """The held lock of one run directory; :meth:`release` deletes the file and lets go."""

    def __init__(self, run_dir: Path, fd: int, created: list[Path]):
        self.run_dir, self.fd, self.created = run_dir, fd, created
        if fd is not None:
            _HELD_FDS.add(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        _HELD_FDS.discard(self.fd)
        try:
            lock_path(self.run_dir).unlink(missing_ok=True)  # while still locked: see the module docstring
        except OSError:
            pass  # the directory was deleted or made read-only; the kernel still drops the lock below
        os.close(self.fd)
        self.fd = None
        for d in self.created:  # directories made only to hold the lock: gone again when nothing else landed
            try:
                d.rmdir()
            except OSError:
                break


def _make_dirs(run_dir: Path) -> list[Path]:
    """Create ``run_dir`` (and missing parents); returns the ones created, deepest first."""
    missing, probe = [], run_dir
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"{run_dir}: cannot be created ({e.strerror or e})") from None
    return missing


def _write_holder(fd: int) -> None:
    data = json.dumps(holder_record(), indent=1).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _acquire_flock(run_dir: Path, log) -> int | None:
    """The locked descriptor, or None when this filesystem has no flock."""
    path = lock_path(run_dir)
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the directory was removed by a writer that just ended: make it again
            _make_dirs(run_dir)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
            os.close(fd)
            raise _refusal(run_dir, holder, hint_delete=False) from None
        except OSError as e:
            os.close(fd)
            if e.errno in _NO_FLOCK:
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # locked a file its holder had just deleted: take the one at the path now
            os.close(fd)
            continue
        left = os.pread(fd, 1 << 16, 0).decode(errors="replace")
        if left.strip():  # the lock was free yet the file still names a holder: that process died
            log(_stale_line(run_dir, _parse(left)))
        return fd
    raise BadInputError(f"{path}: could not be locked (it keeps being replaced); is another cramcl process "
                        "starting and stopping there?")


def _acquire_exclusive_file(run_dir: Path, log) -> int:
    """Without flock: create the file exclusively, taking over a leftover one whose holder is gone."""
    path = lock_path(run_dir)
    for _ in range(5):
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        try:
            text, age = path.read_text(errors="replace"), time.time() - path.stat().st_mtime
        except FileNotFoundError:
            continue
        holder = _parse(text)
        gone = (not holder_alive(holder)) if holder else age > _UNWRITTEN_STALE_S
        if not gone:
            raise _refusal(run_dir, holder, hint_delete=True)
        log(_stale_line(run_dir, holder))
        path.unlink(missing_ok=True)
    raise BadInputError(f"{path}: could not be created; is another cramcl process starting there?")


def acquire(run_dir: Path, log=print) -> RunLock:
    """Take ``DIR/run.lock`` (creating DIR) or raise BadInputError naming its holder."""
    run_dir = Path(run_dir)
    created = _make_dirs(run_dir)
    fd = None
    try:
        fd = _acquire_flock(run_dir, log) if fcntl is not None else None
        if fd is None:
            fd = _acquire_exclusive_file(run_dir, log)
        _write_holder(fd)
    except OSError as e:  # not one of flock's "unsupported" answers: a lock file we cannot use
        if fd is not None:
            RunLock(run_dir, fd, created).release()
        raise BadInputError(f"{lock_path(run_dir)}: cannot be used as this run's lock "
                            f"({e.strerror or type(e).__name__})") from None
    except BaseException:
        if fd is not None:
            RunLock(run_dir, fd, created).release()
        else:
            for d in created:
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise
    return RunLock(run_dir, fd, created)


@contextlib.contextmanager
def hold_run_lock(run_dir: Path, log=print):
    """Hold ``DIR/run.lock`` for the block (main process only; re-entrant within a process); released on any
    exit from it. Refused with BadInputError when another process holds it."""
    if not is_main_process():
        yield None
        return
    key = str(lock_path(Path(run_dir)).resolve())
    with _held_guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is None:
        lock = acquire(Path(run_dir), log)
        with _held_guard:
            entry = _held[key] = [lock, 1]
    try:
        yield entry[0]
    finally:
        with _held_guard:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _held[key]
        if last:
            entry[0].release()


def reader_note(run_dir: Path) -> str | None:
    """For a reader of ``run_dir``: one line when a writer holds it, naming the writer and the finished task
    checkpoint the reader gets (the run is read as of that checkpoint); None when no live writer holds it."""
    holder = read_holder(run_dir)
    if holder is None or not holder_alive(holder):
        return None
    ckpts = Path(run_dir) / "checkpoints"
    done = sorted(int(p.name.split("_")[1]) for p in ckpts.glob("task_*")
                  if p.name.split("_")[1].isdigit() and (p / "manifest.json").exists()) if ckpts.is_dir() else []
    where = (f"only its finished task checkpoints are read (the last: task_{done[-1]})" if done
             else "no task has finished yet, so there is no checkpoint to read")
    return f"{run_dir} is in progress, written by {describe(holder)}; {where}"

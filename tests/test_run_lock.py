"""One writer per run directory (engine/run_lock.py), through the real CLI.

A second writer (`run`, `run --resume`, `run --seeds`, `compare`) on a directory another process holds exits 2
with one line naming the holder and changes nothing; the lock is released on every exit (0, 2, 1, Ctrl-C,
SIGTERM); a lock left by a killed process is taken over and reported; only rank 0 of several processes locks;
readers (`eval`, `inspect`) of a run in progress read its last finished checkpoint and say the run is in
progress. The holder is usually a tiny `python -c` process that takes the lock through the module and sleeps;
one real quick run, paused by SIGSTOP at the start of its second task, is the concurrent writer of the
in-progress tests.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cramcl.cli import main
from cramcl.engine import run_lock
from cramcl.errors import BadInputError

from conftest import QUICK_OVERRIDES, LogSink

HOLD = ("import sys, time\nfrom cramcl.engine.run_lock import hold_run_lock\n"
        "with hold_run_lock(sys.argv[1]):\n    print('ready', flush=True)\n    time.sleep(600)\n")


def hold_elsewhere(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture
def holder(tmp_path):
    procs = []

    def start(run_dir: Path) -> subprocess.Popen:
        procs.append(hold_elsewhere(run_dir))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()
        p.wait()


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``: relative path -> SHA-256 of its bytes ('dir' for a folder)."""
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


def err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def assert_free(run_dir: Path) -> None:
    """No lock file is left and the lock can be taken again (a descriptor still open would refuse it)."""
    assert not run_lock.lock_path(run_dir).exists()
    with run_lock.hold_run_lock(run_dir, log=LogSink()):
        pass


# ------------------------------------------------------------------ a second writer is refused
WRITERS = {
    "run": lambda out: ["run", "--method", "lora-ft", "--profile", "quick", "--out", str(out), *QUICK_OVERRIDES],
    "run --resume": lambda out: ["run", "--resume", "--out", str(out)],
    "run --seeds": lambda out: ["run", "--method", "lora-ft", "--profile", "quick", "--seeds", "0,1", "--out",
                                str(out), *QUICK_OVERRIDES],
    "compare": lambda out: ["compare", "--methods", "lora-ft,replay", "--profile", "quick", "--out", str(out),
                            *QUICK_OVERRIDES],
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_second_writer_exits_2_naming_the_holder_and_changes_nothing(writer, tmp_path, holder, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("method: lora-ft\n")  # a run the holder is writing
    (out / "results").mkdir()
    (out / "results" / "matrix.json").write_text("{}")
    other = holder(out)
    before = tree(out)
    assert main(WRITERS[writer](out)) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"cramcl: error: {out} is in use by python -c (pid {other.pid} on "
                               f"{socket.gethostname()}, since 20"), lines
    assert lines[0].endswith("; wait for it or stop it"), lines
    assert tree(out) == before  # byte for byte, and no file added or removed


def test_compare_is_refused_before_training_when_one_method_directory_is_held(tmp_path, holder, capsys):
    out = tmp_path / "cmp"
    other = holder(out / "replay")  # e.g. a `cramcl run --out cmp/replay` going on
    before = tree(out)
    assert main(WRITERS["compare"](out)) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and f"{out / 'replay'} is in use by python -c (pid {other.pid} " in lines[0], lines
    assert tree(out) == before  # lora-ft, listed first, was not started


# ------------------------------------------------------------------ stale locks
def test_a_lock_left_by_a_killed_process_is_taken_over_and_reported(tmp_path):
    out = tmp_path / "run"
    other = hold_elsewhere(out)
    other.send_signal(signal.SIGKILL)
    other.wait()
    assert run_lock.lock_path(out).exists()  # SIGKILL: no cleanup, the file stays
    assert run_lock.reader_note(out) is None  # a dead holder: readers see no run in progress
    log = LogSink()
    with run_lock.hold_run_lock(out, log=log):
        assert json.loads(run_lock.lock_path(out).read_text())["pid"] == os.getpid()
    assert len(log.lines) == 1, log.lines
    assert "stale lock" in log.lines[0] and f"python -c (pid {other.pid} on {socket.gethostname()}" in log.lines[0]
    assert not run_lock.lock_path(out).exists()
    log = LogSink()
    with run_lock.hold_run_lock(out, log=log):  # released cleanly last time: nothing stale now
        pass
    assert log.lines == []


# ------------------------------------------------------------------ released on every exit
def test_the_lock_is_released_after_exit_2_from_inside_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("method: [unclosed\n")  # --resume reads it under the lock: bad input
    assert main(["run", "--resume", "--out", str(out)]) == 2
    assert "config.yaml" in err_lines(capsys)[0]
    assert_free(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("raised, code", [("RuntimeError", 1), ("KeyboardInterrupt", 130), ("_Terminated", 143)])
def test_the_lock_is_released_after_an_error_ctrl_c_or_sigterm(raised, code, tmp_path, monkeypatch, capsys):
    import cramcl.cli as cli
    import cramcl.engine.session as session

    error = {"RuntimeError": RuntimeError, "KeyboardInterrupt": KeyboardInterrupt, "_Terminated": cli._Terminated}
    seen = []

    def fail(cfg, out, **kwargs):
        seen.append(json.loads(run_lock.lock_path(out).read_text())["pid"])  # held while the run works
        raise error[raised]()

    monkeypatch.setattr(session, "open_session", fail)
    out = tmp_path / "new" / "run"
    assert main(WRITERS["run"](out)) == code
    capsys.readouterr()
    assert seen == [os.getpid()]
    assert not (tmp_path / "new").exists()  # the directories made for the lock alone are gone again
    assert_free(out)


# ------------------------------------------------------------------ several processes, no flock
def test_only_the_main_process_of_several_takes_the_lock(tmp_path, holder, monkeypatch):
    out = tmp_path / "run"
    holder(out)  # rank 0 of the same run
    monkeypatch.setenv("RANK", "1")
    with run_lock.hold_run_lock(out) as lock:  # not refused, and it takes nothing
        assert lock is None
        run_lock.refuse_if_held(out)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(BadInputError, match="is in use by python -c"):
        run_lock.refuse_if_held(out)


def test_without_flock_a_live_holder_is_refused_and_a_dead_one_taken_over(tmp_path, holder, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    out = tmp_path / "run"
    alive = holder(tmp_path / "elsewhere")  # a live pid to name in the file
    path = run_lock.lock_path(out)
    out.mkdir()
    for who, refused in ((alive.pid, True), (dead_pid(), False)):
        path.write_text(json.dumps({**run_lock.holder_record(), "pid": who, "command": "cramcl run"}))
        log = LogSink()
        if refused:
            with pytest.raises(BadInputError, match=f"in use by cramcl run \\(pid {who} .*delete {path}"):
                run_lock.refuse_if_held(out)
            with pytest.raises(BadInputError, match=f"in use by cramcl run \\(pid {who} "):
                with run_lock.hold_run_lock(out, log=log):
                    pass
            assert json.loads(path.read_text())["pid"] == who
        else:
            with run_lock.hold_run_lock(out, log=log):
                assert json.loads(path.read_text())["pid"] == os.getpid()
            assert len(log.lines) == 1 and "stale" in log.lines[0] and f"pid {who} " in log.lines[0]
            assert not path.exists()
    path.write_text(json.dumps({**run_lock.holder_record(), "host": "another-host", "pid": dead_pid()}))
    with pytest.raises(BadInputError, match="on another-host.*if that process is gone"):
        with run_lock.hold_run_lock(out, log=LogSink()):
            pass


# ------------------------------------------------------------------ one real run, paused mid-stream
@pytest.fixture(scope="module")
def paused_run(tmp_path_factory, warm_cache):
    """A real `cramcl run` (lora-ft, 3 quick tasks) stopped by SIGSTOP at the start of its second task, after
    task 0's checkpoint: it holds the lock, as a run in progress does."""
    out = tmp_path_factory.mktemp("real") / "run"
    env = {**os.environ, "CRAMCL_KILL_AT": "task_start:2", "CRAMCL_KILL_SIGNAL": "SIGSTOP", "OMP_NUM_THREADS": "1"}
    logs = out.parent / "a.log"
    with open(logs, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "cramcl", *WRITERS["run"](out)], env=env, stdout=sink,
                                stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert proc.poll() is None and time.time() < deadline, logs.read_text()[-3000:]
        time.sleep(0.2)
    yield proc, out, logs
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_real_second_run_is_refused_while_the_first_is_in_progress(paused_run, capsys):
    proc, out, _ = paused_run
    before = tree(out)
    for argv in (WRITERS["run"](out) + ["train.lr=0.01"], WRITERS["run --resume"](out)):
        assert main(argv) == 2
        lines = err_lines(capsys)
        assert len(lines) == 1 and lines[0].startswith(
            f"cramcl: error: {out} is in use by cramcl run (pid {proc.pid} on {socket.gethostname()}, since "), lines
        assert tree(out) == before


def test_a_reader_of_a_run_in_progress_reads_its_last_finished_checkpoint_and_says_so(paused_run, capsys):
    proc, out, _ = paused_run
    assert main(["eval", "--run", str(out), "--tasks", "shape"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("shape\t")
    notes = [line for line in captured.err.splitlines() if line.startswith("cramcl: note:")]
    assert notes == [f"cramcl: note: {out} is in progress, written by cramcl run (pid {proc.pid} on "
                     f"{socket.gethostname()}, since {json.loads((out / 'run.lock').read_text())['started']}); "
                     "only its finished task checkpoints are read (the last: task_0)"], captured.err
    assert (out / "results" / "eval" / "after_0" / "shape.jsonl").exists()  # task 0's checkpoint was read
    assert not (out / "checkpoints" / "task_1").exists()
    assert main(["inspect", "--run", str(out)]) == 0
    assert capsys.readouterr().err.count(f"is in progress, written by cramcl run (pid {proc.pid} ") == 1


def test_a_reader_before_the_first_task_finishes_says_there_is_nothing_to_read_yet(tmp_path, holder, capsys):
    out = tmp_path / "run"
    holder(out)
    (out / "config.yaml").write_text("method: lora-ft\n")
    assert main(["eval", "--run", str(out)]) == 2
    lines = err_lines(capsys)
    assert "is in progress, written by python -c" in lines[0] and "no task has finished yet" in lines[0], lines


def test_the_run_then_ends_exit_0_releasing_its_lock_and_resume_takes_over_a_stale_one(paused_run, capsys):
    proc, out, logs = paused_run
    deadline = time.time() + 240
    while proc.poll() is None:  # the readers above held nothing: the writer goes on (and stops at each later
        proc.send_signal(signal.SIGCONT)  # task's start, which the kill point hits again)
        assert time.time() < deadline, logs.read_text()[-3000:]
        time.sleep(0.1)
    assert proc.returncode == 0, logs.read_text()[-3000:]
    assert json.loads((out / "results" / "metrics.json").read_text())["complete"]
    assert not (out / "run.lock").exists()
    for manifest in (out / "checkpoints").glob("task_*/manifest.json"):
        assert "run.lock" not in manifest.read_text()
    assert run_lock.reader_note(out) is None

    killed = hold_elsewhere(out)  # a writer killed on this finished run leaves its lock behind
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    matrix = (out / "results" / "matrix.json").read_text()
    assert main(["run", "--resume", "--out", str(out)]) == 0
    stale = [line for line in capsys.readouterr().out.splitlines() if "stale lock" in line]
    assert len(stale) == 1 and f"(pid {killed.pid} on " in stale[0], stale
    assert (out / "results" / "matrix.json").read_text() == matrix
    assert not (out / "run.lock").exists()


FORKED_WORKER = """
import os, sys, time
from pathlib import Path
from cramcl.engine import run_lock
lock = run_lock.acquire(Path(sys.argv[1]), log=lambda *a: None)
if os.fork() == 0:  # a forked DataLoader worker: it outlives its parent by a while
    if sys.argv[2] == "drop":
        run_lock.drop_inherited_locks()
    time.sleep(30)
    os._exit(0)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("worker", ["drop", "keep"])
def test_a_forked_worker_outliving_a_killed_run_does_not_hold_its_lock(tmp_path, worker):
    """The DataLoader's workers call drop_inherited_locks: once the run is killed its lock is free at once even
    while a worker lives on; a worker that kept the inherited descriptor (``keep``) holds the run (the failure
    this guards against)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", FORKED_WORKER, str(out), worker], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        if worker == "drop":
            with run_lock.hold_run_lock(out, log=LogSink()):
                pass
        else:
            with pytest.raises(BadInputError):
                with run_lock.hold_run_lock(out, log=LogSink()):
                    pass
    finally:
        subprocess.run(["pkill", "-f", f"{out}"], check=False)  # the orphaned worker


def test_the_loaders_workers_drop_the_inherited_lock(tmp_path):
    from cramcl.engine import loader

    fd = os.open(tmp_path / "lockfile", os.O_RDWR | os.O_CREAT)
    run_lock._HELD_FDS.add(fd)
    threads = torch.get_num_threads()
    try:
        loader._worker_init(0)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed
    assert not run_lock._HELD_FDS

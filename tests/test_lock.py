"""One writer per folder (``gpas_probe.lock``): a second writer is refused with the holder's PID, a dead
holder's lock is no obstacle, readers see who writes, and releasing leaves the folder as it was."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpas_probe.lock import LOCK_FILE, FolderInUse, RunLock, clear_folder, holder

HOLD = """
import sys, time
from gpas_probe.lock import RunLock
lock = RunLock(sys.argv[1], "train").acquire()
lock.announce()
print("held", flush=True)
time.sleep(60)
"""


def _hold(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    proc = _hold(tmp_path / "run")
    try:
        with pytest.raises(FolderInUse, match=rf"being written by another gpas-probe process \(pid {proc.pid}, train"):
            RunLock(tmp_path / "run", "attach").acquire()
        live = holder(tmp_path / "run")
        assert live is not None and live["pid"] == proc.pid and live["what"] == "train"
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holders_lock_is_no_obstacle(tmp_path: Path) -> None:
    proc = _hold(tmp_path / "run")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "run" / LOCK_FILE).exists()  # left behind, held by nobody
    assert holder(tmp_path / "run") is None
    with RunLock(tmp_path / "run", "train") as lock:
        lock.announce()
        assert holder(tmp_path / "run")["pid"] == os.getpid()  # type: ignore[index]
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_release_removes_the_lock_and_a_folder_it_made(tmp_path: Path) -> None:
    with RunLock(tmp_path / "new", "train"):
        assert (tmp_path / "new" / LOCK_FILE).exists()
    assert not (tmp_path / "new").exists()  # made by the lock, left empty: gone
    (tmp_path / "kept").mkdir()
    with RunLock(tmp_path / "kept", "train"):
        (tmp_path / "kept" / "run.json").write_text("{}")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["run.json"]


def test_clear_folder_keeps_the_lock(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run", "train"):
        (tmp_path / "run" / "sub").mkdir()
        (tmp_path / "run" / "sub" / "x").write_text("x")
        (tmp_path / "run" / "y").write_text("y")
        clear_folder(tmp_path / "run")
        assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_FILE]


def test_a_lock_file_removed_while_waiting_is_not_trusted(tmp_path: Path, monkeypatch) -> None:
    """A writer that locked a file its holder removed meanwhile locks the new one instead."""
    folder = tmp_path / "run"
    first = RunLock(folder, "train").acquire()
    import gpas_probe.lock as lock_mod
    real = lock_mod.fcntl.flock
    calls = []

    def flock(fd: int, op: int) -> None:
        if op & lock_mod.fcntl.LOCK_EX and not calls:  # the holder lets go while we wait
            calls.append(fd)
            first.release()
        real(fd, op)

    monkeypatch.setattr(lock_mod.fcntl, "flock", flock)
    (folder).mkdir(exist_ok=True)
    second = RunLock(folder, "attach").acquire()
    assert second.held and os.fstat(second._fd).st_ino == os.stat(second.path).st_ino  # noqa: SLF001
    second.release()


def test_a_copy_in_another_process_holds_nothing(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / "run", "train").acquire()
    copy = pickle.loads(pickle.dumps(lock))
    assert not copy.held and lock.held
    copy.release()  # closes nothing of ours
    assert holder(tmp_path / "run") is not None  # still held
    lock.release()
    assert holder(tmp_path / "run") is None


def test_a_reader_does_not_block_a_writer(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text("{}")
    t0 = time.monotonic()
    for _ in range(20):
        assert holder(folder) is None
    with RunLock(folder, "train"):
        pass
    assert time.monotonic() - t0 < 30

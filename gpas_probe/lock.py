"""One writer per run folder: an advisory lock held for a writer's life.

``train``, ``attach`` and ``profile`` take :class:`RunLock` on the folder they write. The lock is a
``flock`` on ``FOLDER/.gpas-probe.lock``: the operating system releases it when its holder exits in any
way (a crash or ``SIGKILL`` included), so a lock left by a dead process is never in the way: only its
file stays, holding the last holder's PID for the message. A second writer gets
:class:`FolderInUse` naming the holder. Readers ask :func:`holder` whether a folder is being written
(``info``, ``plot`` and ``compare`` say that a run is still running).

The lock file is removed when its holder lets go (a process killed meanwhile leaves it behind, harmless:
nobody holds it), together with the folder if taking the lock created it and it stayed empty. A writer
that locked a file removed meanwhile notices (the path no longer names the file it locked) and locks the
new one, so two writers never hold two different files. :func:`clear_folder` empties a folder around its
lock file. Where ``fcntl`` is missing (Windows), locking is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = ".gpas-probe.lock"


class FolderInUse(FileExistsError):
    """Another live process writes this folder."""


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "starting up"
    parts = [f"pid {info.get('pid', '?')}"]
    if info.get("host") and info["host"] != socket.gethostname():
        parts.append(f"on {info['host']}")
    if info.get("what"):
        parts.append(str(info["what"]))
    if isinstance(info.get("started"), (int, float)):
        parts.append("since " + time.strftime("%H:%M:%S", time.localtime(info["started"])))
    return ", ".join(parts)


def _read(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


class RunLock:
    """The write lock of ``folder`` (created if missing), taken by :meth:`acquire` or ``with``; ``what``
    says who holds it (``"train"``, ``"profile"``, ``"attach"``) in a second writer's error. ``lock_file``
    puts the lock elsewhere, for a folder that is replaced whole when written (a profile's): then the
    folder is not created."""

    def __init__(self, folder: str | Path, what: str, lock_file: str | Path | None = None) -> None:
        self.folder = Path(folder)
        self.what = what
        self._path = Path(lock_file) if lock_file is not None else None
        self._fd: int | None = None
        self._made_dir = False

    @property
    def path(self) -> Path:
        return self._path or self.folder / LOCK_FILE

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`FolderInUse`. Nothing is written until :meth:`announce`, so a
        writer that is then refused leaves the folder as it was."""
        if self._fd is not None:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder} is a file, not a run folder")
        if fcntl is None:  # pragma: no cover - Windows
            log.warning("no file locking on this platform: nothing stops two writers of %s", self.folder)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self
        while True:
            if not self.path.parent.exists():  # (again, if a refused writer's release removed it meanwhile)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._made_dir = True
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder went between the two calls: make it again
                continue
            try:
                self._lock(fd)
                if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the file was removed while we waited (a refused writer's): lock the new one
        self._fd = fd
        return self

    def _lock(self, fd: int) -> None:
        for attempt in range(3):  # a reader's brief shared lock (holder()) is not a writer
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if attempt == 2:
                    raise FolderInUse(f"{self.folder} is being written by another gpas-probe process "
                                      f"({_describe(_read(self.path))}); wait for it to finish, stop it, "
                                      "or use another folder") from None
                time.sleep(0.05)

    def announce(self) -> None:
        """Write who holds the lock (PID, host, command, start time) for other writers' errors."""
        if self._fd is None:
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what, "started": time.time(),
                "command": " ".join(sys.argv[:6])}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        """Let go: the lock file goes (removed while still held), and the folder if taking the lock made it
        and it is empty (a refused or discarded new run leaves nothing)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        if self._made_dir:
            try:
                self.path.parent.rmdir()
            except OSError:  # not empty: the writer's work stays
                pass

    def __getstate__(self) -> dict[str, Any]:  # another process's copy holds nothing
        return {**self.__dict__, "_fd": None}

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(folder: str | Path) -> dict[str, Any] | None:
    """Who writes ``folder`` now (``pid``, ``what``, ``started``, ``text``), or None when nobody does."""
    path = Path(folder) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        info = _read(path)
        return {**info, "text": _describe(info)}
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def clear_folder(folder: str | Path) -> None:
    """Remove everything in ``folder`` but its lock file (which its writer holds)."""
    for p in Path(folder).iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()

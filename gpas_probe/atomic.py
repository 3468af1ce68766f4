"""Writes that appear whole or not at all: a file or a folder is built under a hidden temporary name in
its destination's folder, then renamed into place (``os.replace``, atomic on one file system).

A process killed mid-write leaves only the hidden temporary, which :func:`remove_temporaries` clears.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path


def temporary_file(path: Path) -> Path:
    """The hidden temporary that :func:`write_atomic` writes ``path`` under."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a hidden temporary beside ``path``, then rename it to ``path``."""
    tmp = temporary_file(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_atomic` for a text file."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_dir(path: Path) -> Path:
    """A new hidden folder beside ``path`` (which need not exist), with ordinary permissions, to be
    filled and then published with :func:`publish_dir`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir(mode=0o777 & ~_umask())
    return tmp


def publish_dir(tmp: Path, path: Path) -> None:
    """Move a finished temporary folder into place, replacing any older one whole."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def remove_temporaries(directory: str | Path) -> None:
    """Clear what interrupted :func:`publish_dir` calls may leave in ``directory``: unfinished temporary
    folders are removed; a replaced folder whose successor never arrived is put back."""
    d = Path(directory)
    if not d.is_dir():
        return
    for p in sorted(d.iterdir()):
        if not (p.is_dir() and p.name.startswith(".")):
            continue
        name, sep, _ = p.name[1:].partition(".old-")
        if sep and not (d / name).exists():
            os.replace(p, d / name)
        elif sep or ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True)

"""Failures a user meets rather than causes (out of memory, a read-only or full disk): one ``error:`` line,
exit code 2, no traceback, and no half-made run left behind (a failed start leaves no folder, so a retry
is not refused)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_corpus
from safetensors import SafetensorError
from typer.testing import CliRunner

import gpas_probe.checkpoints.native as native
from gpas_probe.cli.main import app
from gpas_probe.probes import load_run

runner = CliRunner()
resource = pytest.importorskip("resource")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"), seed=5, words=3000)


def _one_line(res, message: str) -> None:
    """One error line (after progress lines, if training ran), no traceback."""
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    lines = [line for line in res.output.splitlines() if line.strip() and " tok/s, elapsed " not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output


def _limited(args: list[str]) -> subprocess.CompletedProcess:
    """The CLI in a process whose address space is capped at 4 GiB (``ulimit -v``)."""
    cap = 4 << 30
    code = "import sys; from gpas_probe.cli.main import app; app(sys.argv[1:], prog_name='gpas-probe')"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))


@pytest.mark.parametrize("command", ["train", "profile"])
def test_out_of_memory_is_one_line_and_leaves_nothing(tmp_path: Path, text: Path, command: str) -> None:
    out = tmp_path / "out"
    if command == "train":
        args = ["train", "--preset", "small", "--batch-size", "100000", "--steps", "3", "--data", str(text),
                "--device", "cpu", "--out", str(out)]
    else:
        small = tmp_path / "run"
        res = runner.invoke(app, ["train", "--preset", "tiny", "--steps", "2", "--seq-len", "16", "--data", str(text),
                                  "--device", "cpu", "--out", str(small), "--probe-every", "0"])
        assert res.exit_code == 0, res.output
        args = ["profile", str(small), "--out", str(out), "--batch-size", "200000", "--seq-len", "128"]
    res = _limited(args)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: out of memory (") and "try a smaller --batch-size" \
        in errors[0], res.stderr[-3000:]
    assert not out.exists() or not any(out.iterdir())  # no half-made run or profile


def _read_only(monkeypatch, folder: Path) -> None:
    """Every write under ``folder`` fails as on a read-only file system."""
    def refuse(path: object) -> None:
        if str(os.fspath(path)).startswith(str(folder)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_mkdir, real_open, real_os_open = Path.mkdir, open, os.open

    def mkdir(self, *a, **k):
        refuse(self)
        return real_mkdir(self, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    import matplotlib.figure
    real_save = matplotlib.figure.Figure.savefig

    def savefig(self, fname, *a, **k):
        refuse(fname)
        return real_save(self, fname, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    del real_open


def test_a_read_only_destination_is_one_line(tmp_path: Path, text: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--preset", "tiny", "--steps", "2", "--seq-len", "16", "--data", str(text),
                              "--device", "cpu", "--out", str(run)])
    assert res.exit_code == 0, res.output
    ro = tmp_path / "ro"
    _read_only(monkeypatch, ro)
    for args in (["train", "--preset", "tiny", "--steps", "2", "--out", str(ro / "x")],
                 ["plot", "loss", str(run), "-o", str(ro / "loss.png")],
                 ["profile", str(run), "--out", str(ro / "p"), "--seq-len", "16"]):
        _one_line(runner.invoke(app, args), "read-only file system; write somewhere writable (--out, -o)")
    assert not ro.exists()


def test_a_full_disk_at_a_checkpoint_keeps_the_rows_and_says_so(tmp_path: Path, text: Path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(native, "save_file", full)
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--preset", "tiny", "--steps", "3", "--seq-len", "16", "--data", str(text),
                              "--device", "cpu", "--probe-every", "1", "--out", str(run)])
    _one_line(res, "step_000003: no space left on device; free some space, then run again")
    assert sorted(load_run(run).step.unique()) == [1, 2, 3]  # the rows are kept
    assert not list((run / "checkpoints").rglob("*.safetensors"))  # no half-written checkpoint
    info = runner.invoke(app, ["info", str(run)])
    assert "status: stopped before its first checkpoint: start it again with --overwrite" in info.output

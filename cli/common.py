"""Shared CLI plumbing: one-line errors instead of tracebacks, progress bars, logging set-up."""

from __future__ import annotations

import errno
import functools
import logging
import shlex
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from gpas_probe.errors import first_line
from gpas_probe.interrupt import Interrupted

if TYPE_CHECKING:
    import pandas as pd

    from gpas_probe.report.tables import Table as PlainTable

console = Console()
err_console = Console(stderr=True)

#: Exceptions that mean "bad input": reported as one line, exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError, ImportError)

F = TypeVar("F", bound=Callable[..., Any])


def rich_table(table: PlainTable, styles: Mapping[str, str] | None = None) -> Table:
    """A report's plain table (:mod:`gpas_probe.report.tables`) as a rich table: its cells as text (never
    markup), bold where bold, a cell's style class through ``styles``, rules after the marked rows, and
    cells that fold (never cut) when the table is narrower than its natural width."""
    out = Table(title=table.title or None, title_justify="left")
    for i, name in enumerate(table.columns):
        out.add_column(name, justify="left" if i in table.left else "right", overflow="fold")
    for i, row in enumerate(table.rows):
        cells = [Text(c.text, style=" ".join(filter(None, ("bold" if c.bold else "",
                                                           (styles or {}).get(c.style, ""))))) for c in row]
        out.add_row(*cells, end_section=i in table.rules)
    return out


def print_wide(table: Table) -> None:
    """Print a table whole: in a terminal fitted to the window (cells fold, never cut); into a pipe or a
    file at its natural width, uncropped (rich would otherwise cut it at 80 columns)."""
    if not console.is_terminal:
        table.width = Measurement.get(console, console.options.update_width(1_000_000), table).maximum
    console.print(table, crop=console.is_terminal)


def print_next(*commands: list[str | Path]) -> None:
    """The commands to run next, with the real paths, quoted for a shell."""
    console.print("next:", style="bold", highlight=False)
    for words in commands:
        console.print("  " + shlex.join(["gpas-probe", *map(str, words)]), highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text))


#: What to do about a failing system call, by errno.
_OS_HINTS = {errno.ENOSPC: "free some space, then run again (a run continues with --resume)",
             errno.EROFS: "write somewhere writable (--out, -o)",
             errno.EACCES: "write somewhere you may write (--out, -o), or fix the permissions",
             errno.EDQUOT: "free some space, then run again (a run continues with --resume)"}


def system_error_line(e: BaseException) -> str | None:
    """The one line for running out of memory or a failing system call (full or read-only disk, no
    permission), or None for other errors."""
    if _out_of_memory(e):
        return (f"out of memory ({first_line(e)}); try a smaller --batch-size or --seq-len"
                + (" (or --device cpu)" if "cuda" in str(e).lower() else ""))
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        hint = _OS_HINTS.get(e.errno)
        return f"{where}{e.strerror.lower()}" + (f"; {hint}" if hint else "")
    return None


def friendly_errors(fn: F) -> F:
    """Turn the library's input errors, running out of memory and failing system calls (full or read-only
    disk, permissions) into ``error: ...`` on stderr and exit code 2.

    An error marked ``quiet`` (reported already, or by rank 0 of a torchrun launch) exits with the
    same code without printing. Ctrl-C exits with 130.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            fail(str(e) if isinstance(e, Interrupted) else "interrupted", code=130)
        except (*USER_ERRORS, OSError, MemoryError, RuntimeError) as e:
            if getattr(e, "quiet", False):
                logging.getLogger(__name__).info("error reported already: %s", e)
                raise typer.Exit(2) from None
            line = system_error_line(e)
            if line is None and not isinstance(e, USER_ERRORS):
                raise
            fail(line or first_line(e))

    return wrapper  # type: ignore[return-value]


def resolve_runs(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """The runs the paths name (an output root holding one run is that run; one holding several is an
    error listing them) and a distinct label for each (runs whose folders share a name get their paths'
    distinct endings)."""
    from gpas_probe.folders import run_folders, run_labels

    folders = run_folders(paths)
    return folders, run_labels(folders)


def read_runs(paths: list[Path]) -> pd.DataFrame:
    """The runs' probe tables (each must have rows), labelled as :func:`resolve_runs` says, saying which are
    still being written."""
    return read_resolved(*resolve_runs(paths))


def read_resolved(folders: list[Path], labels: list[str]) -> pd.DataFrame:
    """:func:`read_runs` of runs :func:`resolve_runs` resolved already."""
    from gpas_probe.store import load_runs, run_writer

    data = load_runs(folders, labels, require_rows=True)
    for run in folders:
        if (live := run_writer(run)) is not None:
            err_console.print(f"{run} is still running ({live['text']}): using the rows written so far",
                              style="dim", highlight=False, soft_wrap=True)
    return data


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record arrives (it may be replaced between commands
    run in one process)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(verbose: bool) -> None:
    """Warnings (everything with ``verbose``) as ``LEVEL name: message``; progress lines (where output is
    not a terminal: :mod:`gpas_probe.progress`) as they are, always."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    progress = logging.getLogger("gpas_probe.progress")
    if not progress.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        progress.propagate = False

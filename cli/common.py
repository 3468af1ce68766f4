"""Shared CLI plumbing: one-line errors instead of tracebacks, progress bars, logging set-up."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from gpas_probe.distributed import DistContext, mark_quiet
from gpas_probe.progress import bar_columns

console = Console()
err_console = Console(stderr=True)

#: Exceptions that mean "bad input": reported as one line, exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError, ImportError)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def error_line(e: BaseException) -> str:
    """The one line an error is reported with."""
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


def friendly_errors(fn: F) -> F:
    """Turn the library's input errors into ``error: ...`` on stderr and a non-zero exit.

    An error marked ``quiet`` (reported already, or by rank 0 of a torchrun launch) exits with the
    same code without printing.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            if getattr(e, "quiet", False):
                logging.getLogger(__name__).info("error reported already: %s", e)
                raise typer.Exit(2) from None
            fail(error_line(e))
        except KeyboardInterrupt:
            fail("interrupted", code=130)

    return wrapper  # type: ignore[return-value]


@contextmanager
def reported_by_rank0(ctx: DistContext) -> Iterator[None]:
    """Under ``torchrun``, an input error every rank raises together is printed by rank 0 before the ranks
    leave (torchrun stops the other processes as soon as one exits, so a report printed after that might
    never appear); the error is then marked as reported. One process: nothing changes."""
    try:
        yield
    except USER_ERRORS as e:
        if ctx.distributed and getattr(e, "shared", False) and not getattr(e, "quiet", False):
            err_console.print(f"[bold red]error:[/] {escape(error_line(e))}", highlight=False, soft_wrap=True)
            mark_quiet(e)
        raise


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


@contextmanager
def progress_bar(description: str, total: int, fields: str = "", *, lazy: bool = False,
                 **initial: Any) -> Iterator[tuple[Progress, Any]]:
    """A rich progress bar; ``fields`` formats the task's fields, whose first values are ``initial``.

    ``lazy``: the bar appears with its first update (so an error during set-up prints alone).
    """
    progress = Progress(*bar_columns(fields), console=err_console, transient=False)
    task = progress.add_task(description, total=total, **initial)
    if lazy:
        update = progress.update

        def start_then_update(*args: Any, **kwargs: Any) -> None:
            if not progress.live.is_started:
                progress.start()
            update(*args, **kwargs)

        progress.update = start_then_update  # type: ignore[method-assign]
    else:
        progress.start()
    try:
        yield progress, task
    finally:
        if progress.live.is_started:
            progress.stop()

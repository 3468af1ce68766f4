"""Shared CLI plumbing: one-line errors instead of tracebacks, progress bars, logging set-up."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()
err_console = Console(stderr=True)

#: Exceptions that mean "bad input": reported as one line, exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError, ImportError)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def friendly_errors(fn: F) -> F:
    """Turn the library's input errors into ``error: ...`` on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            msg = str(e).strip()
            fail(msg.splitlines()[0] if msg else type(e).__name__)
        except KeyboardInterrupt:
            fail("interrupted", code=130)

    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@contextmanager
def progress_bar(description: str, total: int, fields: str = "", **initial: Any) -> Iterator[tuple[Progress, Any]]:
    """A rich progress bar; ``fields`` formats the task's fields, whose first values are ``initial``."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if fields:
        columns.append(TextColumn(fields))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=False) as progress:
        yield progress, progress.add_task(description, total=total, **initial)

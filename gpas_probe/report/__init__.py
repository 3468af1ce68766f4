"""One self-contained HTML file of runs or profiles (``gpas-probe report``): their metadata, the diagnosis
with its evidence table, the comparison (by seed groups where runs differ only by seed), every figure the
data call for, and the command that regenerates each piece.

``write_report(paths, out)`` writes it and returns its path; ``build_report`` gathers the content and
``render_html`` writes the page (:mod:`~gpas_probe.report.content`, :mod:`~gpas_probe.report.html`). Nothing
here imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from gpas_probe.atomic import write_atomic
from gpas_probe.report.content import Report, build_report
from gpas_probe.report.html import render_html

log = logging.getLogger(__name__)

SUFFIXES = (".html", ".htm")


def check_output(out: str | Path) -> Path:
    """``out`` as a report file: an ``.html`` (or ``.htm``) name that is not a folder."""
    out = Path(out)
    if out.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{out}: a report is an HTML file: name it with .html")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder: name the report file, e.g. {out / 'report.html'}")
    return out


def write_report(paths: Sequence[str | Path], out: str | Path | None = None, *, data: pd.DataFrame | None = None,
                 fmt: str = "png", dpi: int = 100, captions: Mapping[str, str] | None = None) -> Path:
    """Write the report of the runs or profiles ``paths`` name to ``out`` (default ``report.html`` in the
    first run's folder; parent folders are created) and return its path. See :func:`build_report` for the
    options."""
    if out is not None:
        out = check_output(out)
    report = build_report(paths, out, data=data, fmt=fmt, dpi=dpi, captions=captions)
    target = check_output(report.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    page = render_html(report)
    write_atomic(target, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    log.info("wrote the report of %d run(s) to %s", len(report.runs), target)
    return target


__all__ = ["Report", "build_report", "check_output", "render_html", "write_report"]

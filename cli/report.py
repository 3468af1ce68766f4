"""``gpas-probe report``: one self-contained HTML file of runs or profiles (metadata, diagnosis, comparison,
figures, and the commands that regenerate each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gpas_probe.cli.common import console, friendly_errors, read_resolved, resolve_runs


@friendly_errors
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run or profile folders (or their probes/ folders), or an output "
                                                    "folder holding one run.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The HTML file to write (default: "
                                                "report.html in the first run's folder).")] = None,
    svg: Annotated[bool, typer.Option("--svg", help="Embed the figures as inline SVG (sharp at any zoom, larger) "
                                                    "instead of PNG.")] = False,
    dpi: Annotated[int, typer.Option(min=30, max=600, help="Resolution of the PNG figures.")] = 100,
) -> None:
    """One HTML file, readable offline and on a phone: each run's metadata, the diagnosis with its evidence,
    the comparison of several runs, every figure the data hold, and the command that regenerates each."""
    from gpas_probe.cli.analyze import FIGURE_HELP
    from gpas_probe.report import check_output, write_report

    if output is not None:
        check_output(output)  # before the work, not after
    folders, labels = resolve_runs(runs)
    data = read_resolved(folders, labels)
    target = write_report(folders, output, data=data, fmt="svg" if svg else "png", dpi=dpi, captions=FIGURE_HELP)
    console.print(f"wrote {target}", highlight=False, soft_wrap=True, markup=False)

"""The figures of a report: which kinds the data call for, each drawn as ``gpas-probe plot`` draws it and
embedded in the page (a PNG data URI, or inline SVG markup), or left out with the reason.

Training runs get the training figures, profiles the profile figures (a report of both draws each set over
its own runs). Runs of one configuration with different seeds are drawn as their mean with a 95% band, as
``plot`` draws the same runs without ``--each-run``. A figure whose data are missing (``MissingDataError``: no GPAS
gates in any run, a single profiled step for importance over training, ...) is left out, with its message.
"""

from __future__ import annotations

import base64
import io
import logging
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from gpas_probe.analysis.seeds import grouped
from gpas_probe.plots import FIGURES, MissingDataError, make_figure
from gpas_probe.table import aggregate_runs

log = logging.getLogger(__name__)

TRAINING_FIGURES = ("variance", "heatmap", "ratio", "grad", "gates", "loss")
PROFILE_FIGURES = ("importance", "angular", "importance-steps")
FORMATS = ("png", "svg")


@dataclass
class FigureView:
    """One embedded figure: its kind, the runs drawn, the command that draws it again, a caption, and
    ``image``: a ``data:image/png;base64,...`` URI (``fmt='png'``) or the ``<svg>`` element (``fmt='svg'``)."""

    kind: str
    runs: list[str]
    command: str
    caption: str
    image: str
    fmt: str


@dataclass
class LeftOut:
    """A figure the report does not hold, why, and the command that would say so."""

    kind: str
    reason: str
    command: str


def command_line(*words: object) -> str:
    """``gpas-probe WORDS...``, quoted for a shell."""
    return shlex.join(["gpas-probe", *map(str, words)])


def plot_command(kind: str, folders: Sequence[Path | str]) -> str:
    """``gpas-probe plot KIND RUN... -o KIND.png``, quoted for a shell."""
    return command_line("plot", kind, *folders, "-o", f"{kind}.png")


def caption_of(kind: str, captions: Mapping[str, str] | None = None) -> str:
    """The figure's caption: ``captions[kind]``, else the first sentence of its function's docstring."""
    if captions and kind in captions:
        return captions[kind]
    doc = (FIGURES[kind].__doc__ or kind).strip()
    return " ".join(doc.split(". ")[0].split()) + "."


def embed(fig: Figure, fmt: str = "png", dpi: int = 100) -> str:
    """A figure as a PNG data URI or as the markup of an ``<svg>`` element (text drawn as paths: no font is
    needed to view it)."""
    if fmt == "png":
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    if fmt == "svg":
        text = io.StringIO()
        fig.savefig(text, format="svg", bbox_inches="tight",
                    metadata={"Date": None, "Type": None, "Format": None, "Creator": None})
        markup = text.getvalue()
        return markup[markup.index("<svg"):].strip()
    raise ValueError(f"unknown figure format {fmt!r}; choose one of {', '.join(FORMATS)}")


def figure_plan(kinds: Mapping[str, str], multi_step_profile: bool) -> list[tuple[str, list[str]]]:
    """``(figure kind, the runs it draws)`` for runs given as ``label -> 'training run' | 'profile'``: the
    training figures over the training runs, the profile figures over the profiles (importance over training
    only when a profile holds several steps), in the order of :data:`FIGURES`."""
    training = [run for run, kind in kinds.items() if kind != "profile"]
    profiles = [run for run, kind in kinds.items() if kind == "profile"]
    plan = [(k, training) for k in TRAINING_FIGURES if training]
    plan += [(k, profiles) for k in PROFILE_FIGURES if profiles and (k != "importance-steps" or multi_step_profile)]
    return plan


def draw_figures(data: pd.DataFrame, plan: Sequence[tuple[str, list[str]]], folders: Mapping[str, Path],
                 groups: Mapping[str, str] | None = None, *, fmt: str = "png", dpi: int = 100,
                 captions: Mapping[str, str] | None = None) -> tuple[list[FigureView], list[LeftOut]]:
    """Draw every planned figure from ``data``: the figures, and those left out because their data are
    missing. Where a figure's runs hold several of one group (``groups``: ``run -> group``, the seeds of one
    configuration), it draws each group's mean with a 95% band, as ``plot`` does for those runs."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown figure format {fmt!r}; choose one of {', '.join(FORMATS)}")
    shown, left_out = [], []
    tables: dict[tuple[str, ...], tuple[pd.DataFrame, list[str]]] = {}
    for kind, runs in plan:
        command = plot_command(kind, [folders[r] for r in runs])
        if tuple(runs) not in tables:
            mine = {r: (groups or {}).get(r, r) for r in runs}
            tables[tuple(runs)] = ((aggregate_runs(data, mine), list(dict.fromkeys(mine.values())))
                                   if grouped(mine) else (data, list(runs)))
        table, drawn = tables[tuple(runs)]
        try:
            fig = make_figure(kind, table, drawn)
        except MissingDataError as e:
            log.info("figure %s left out: %s", kind, e)
            left_out.append(LeftOut(kind, str(e), command))
            continue
        try:
            image = embed(fig, fmt, dpi)
        finally:
            plt.close(fig)
        shown.append(FigureView(kind, drawn, command, caption_of(kind, captions), image, fmt))
    return shown, left_out

"""What a report holds, gathered from runs and profiles before any HTML is written: each run's metadata,
the diagnosis, the comparison (by seed groups where runs differ only by seed), the figures, and the
commands that regenerate each piece."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from gpas_probe._version import __version__
from gpas_probe.analysis.diagnosis import diagnose_runs
from gpas_probe.analysis.seeds import grouped, groups_and_seeds, paired_differences, seed_summary
from gpas_probe.analysis.summary import COMPARE_LABELS, COMPARE_LEGEND, SEED_LEGEND, compare_runs
from gpas_probe.folders import run_folders, run_home, run_labels
from gpas_probe.report.describe import PROFILE, run_facts, run_kind
from gpas_probe.report.figures import FigureView, LeftOut, command_line, draw_figures, figure_plan, plot_command
from gpas_probe.report.tables import Table, bounds, frame_table
from gpas_probe.report.verdicts import DiagnosisView, diagnosis_view, overall_verdict
from gpas_probe.store import load_runs, read_meta
from gpas_probe.store.schema import IMPORTANCE_SITE
from gpas_probe.table import select

log = logging.getLogger(__name__)


@dataclass
class RunView:
    """One run or profile: its label, folder, kind, the facts listed, and its whole probe metadata."""

    label: str
    folder: Path
    kind: str
    facts: list[tuple[str, str]]
    meta: dict[str, Any]


@dataclass
class Command:
    """A command that regenerates one piece of the report, and what it regenerates."""

    what: str
    command: str


@dataclass
class Report:
    """Everything a report shows (:func:`build_report`); :func:`gpas_probe.report.html.render_html` writes it."""

    runs: list[RunView]
    verdict: str
    diagnoses: list[DiagnosisView]
    comparison: Table | None
    comparison_lines: list[str]
    figures: list[FigureView]
    left_out: list[LeftOut]
    commands: list[Command]
    cwd: str
    out: Path
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    version: str = __version__

    @property
    def title(self) -> str:
        return "gpas-probe report: " + ", ".join(r.label for r in self.runs)


def probe_meta(folder: Path) -> dict[str, Any]:
    """A run's probe metadata, or ``{}`` when it has none (rows written by other means: the report then says
    what is not recorded)."""
    try:
        return read_meta(folder)
    except (OSError, ValueError) as e:
        log.warning("%s: no probe metadata (%s); its report lists what its rows hold", folder, e)
        return {}


def comparison(data: pd.DataFrame, groups: Mapping[str, str],
               seeds: Mapping[str, int | None]) -> tuple[Table, list[str]]:
    """The table ``gpas-probe compare`` prints, and the lines under it (legend, paired differences)."""
    per_run = compare_runs(data)
    if not grouped(groups):
        return frame_table(per_run, "runs compared", COMPARE_LABELS), [COMPARE_LEGEND]
    summary = seed_summary(data, groups, per_run)
    summary.insert(2, "val 95%", [bounds(lo, hi) for lo, hi in zip(summary["val_lo"], summary["val_hi"],
                                                                     strict=True)])
    table = frame_table(summary.drop(columns=["val_lo", "val_hi"]),
                        "configurations compared: means over their seeds", COMPARE_LABELS)
    lines = [SEED_LEGEND + COMPARE_LEGEND]
    for name, row in paired_differences(data, groups, seeds, per_run).iterrows():
        if row["pairs"] < 2:
            lines.append(f"{name}: {row['pairs']} shared seed(s), too few for an interval")
            continue
        verdict = "beyond" if row["beyond_noise"] else "within"
        lines.append(f"{name}: final validation loss {row['difference']:+.4f}, 95% interval "
                     f"{bounds(row['lo'], row['hi'], '{:+.4f}')} over {row['pairs']} paired seeds: "
                     f"{verdict} the seed-to-seed noise")
    return table, lines


def build_report(paths: Sequence[str | Path], out: str | Path | None = None, *, data: pd.DataFrame | None = None,
                 fmt: str = "png", dpi: int = 100, captions: Mapping[str, str] | None = None) -> Report:
    """Gather a report of the runs or profiles ``paths`` name (run folders, their ``probes/`` folders, or
    output folders holding one run). ``out`` is where the report will be written (for its regenerate
    command; default ``report.html`` in the first run's folder). ``data``: their probe table when read
    already, labelled as :func:`gpas_probe.folders.run_labels` labels them (the CLI's ``read_runs``).
    ``fmt``: figures as ``'png'`` (data URIs, ``dpi``) or ``'svg'`` (inline); ``captions`` by figure kind."""
    folders = run_folders(paths)
    if not folders:
        raise ValueError("no run given: name at least one run or profile folder")
    labels = run_labels(folders)
    if data is None:
        data = load_runs(folders, labels, require_rows=True)
    out = Path(out) if out is not None else run_home(folders[0]) / "report.html"
    metas = {label: probe_meta(folder) for label, folder in zip(labels, folders, strict=True)}
    by_label = dict(zip(labels, folders, strict=True))
    frames = {str(k): v for k, v in data.groupby(data["run_id"].astype(str), sort=False)}
    runs = [RunView(label, by_label[label], run_kind(metas[label]),
                    run_facts(by_label[label], label, metas[label], frames.get(label, data.iloc[:0])),
                    metas[label]) for label in labels]

    results = diagnose_runs(data)
    diagnoses = [diagnosis_view(d) for d in results.values()]
    groups, seeds = groups_and_seeds(metas)
    table, lines = comparison(data, groups, seeds) if len(folders) > 1 else (None, [])

    kinds = {r.label: r.kind for r in runs}
    importance = select(data, site=IMPORTANCE_SITE)
    steps = importance.groupby(importance["run_id"].astype(str))["step"].nunique()
    multi_step = bool((steps > 1).any())
    shown, left_out = draw_figures(data, figure_plan(kinds, multi_step), by_label, groups, fmt=fmt, dpi=dpi,
                                   captions=captions)
    profiles = [by_label[r.label] for r in runs if r.kind == PROFILE]
    if profiles and not multi_step:
        left_out.append(LeftOut("importance-steps", "each profile holds one checkpoint step: importance over "
                                "training needs a run profiled at several checkpoints",
                                plot_command("importance-steps", profiles)))

    commands = [Command("this report", command_line("report", *folders, "-o", out))]
    commands += [Command(f"metadata of {r.label}", command_line("info", r.folder)) for r in runs]
    commands.append(Command("the diagnosis", command_line("diagnose", *folders)))
    if table is not None:
        commands.append(Command("the comparison", command_line("compare", *folders)))
    commands += [Command(f"the {f.kind} figure", f.command) for f in shown]
    log.info("report of %d run(s): %d figure(s), %d left out", len(runs), len(shown), len(left_out))
    return Report(runs=runs, verdict=overall_verdict([d.verdict for d in diagnoses]), diagnoses=diagnoses,
                  comparison=table, comparison_lines=lines, figures=shown, left_out=left_out, commands=commands,
                  cwd=os.getcwd(), out=out)

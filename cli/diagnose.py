"""``gpas-probe diagnose``: a verdict on deep-layer underuse, with the evidence per layer.

Into a pipe or a file the evidence table is printed at its natural width and every other line whole,
so that no number or header is cut or folded; in a terminal the table fits the window, folding cells
(never an ellipsis).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from gpas_probe.analysis.diagnosis import SIGNAL_NAMES, VOTE_RULE, Diagnosis, Thresholds, diagnose_runs
from gpas_probe.cli.common import console, friendly_errors, print_wide, read_runs, rich_table

_DEFAULTS = Thresholds()
Opt = typer.Option

_VERDICT_STYLE = {"underuse": "bold red", "ok": "bold green", "inconclusive": "bold yellow",
                  "insufficient data": "bold yellow"}
_STATUS_STYLE = {"underused": "bold red", "used": "green", "inconclusive": "yellow", "no evidence": "dim"}


def evidence_table(d: Diagnosis) -> Table:
    """The evidence per layer of the signals used, with each layer's status (the report's table,
    :func:`gpas_probe.report.verdicts.evidence_table`, in the terminal's colours); cells fold, never end in
    an ellipsis, when the table is narrower than its natural width."""
    from gpas_probe.report.verdicts import evidence_table as plain

    return rich_table(plain(d), _STATUS_STYLE)


def _say(text: str | Text) -> None:
    """One line of the report, never read as markup: wrapped to a terminal's window, whole into a pipe or a
    file."""
    console.print(text if isinstance(text, Text) else Text(text), highlight=False,
                  soft_wrap=not console.is_terminal)


def _report(d: Diagnosis) -> None:
    """What ``diagnose`` prints of one run: the words of :mod:`gpas_probe.report.verdicts`, in colour."""
    from gpas_probe.report.verdicts import diagnosis_lines, verdict_line

    if d.summary["signals_used"]:
        print_wide(evidence_table(d))
    for line in diagnosis_lines(d):
        if line.startswith("finding: "):
            _say(Text.assemble(("finding:", "bold"), line.removeprefix("finding:")))
        else:
            _say(("  " if line.startswith("missing ") else "") + line)
    head, _, detail = verdict_line(d).partition(" — ")
    _say(Text.assemble((head, _VERDICT_STYLE[d.verdict]), f" — {detail}"))
    if d.summary["advice"]:
        _say(f"to settle it: {d.summary['advice']}")


@friendly_errors
def diagnose_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run or profile folders (or their probes/ folders).")],
    json_out: Annotated[bool, Opt("--json", help="Print only JSON (every run's verdict and evidence).")] = False,
    strict: Annotated[bool, Opt("--strict", help="Exit with code 1 when any run shows underuse.")] = False,
    step: Annotated[int | None, Opt(help="Read every signal at this step (default: each at its last recorded "
                                         "step).")] = None,
    max_var_rel: Annotated[float | None, Opt(help="Variance fires above this multiple of layer 0's "
                                                  f"(default {_DEFAULTS.max_var_rel}).")] = None,
    max_ratio: Annotated[float | None, Opt(help="Shortcut/branch RMS ratio fires above this (default "
                                                f"{_DEFAULTS.max_ratio}).")] = None,
    min_grad_rel: Annotated[float | None, Opt(help="Gradient norm fires below this fraction of the shallow "
                                                   f"half's median (default {_DEFAULTS.min_grad_rel}).")] = None,
    min_deletion: Annotated[float | None, Opt(help="Deletion fires below this loss increase in nats "
                                                   f"(default {_DEFAULTS.min_deletion})...")] = None,
    min_deletion_rel: Annotated[float | None, Opt(help="... or below this fraction of the median layer's "
                                                       f"(default {_DEFAULTS.min_deletion_rel}).")] = None,
    min_angular: Annotated[float | None, Opt(help="Angular distance to the next layer fires below this "
                                                  f"(default {_DEFAULTS.min_angular})...")] = None,
    min_angular_rel: Annotated[float | None, Opt(help="... or below this fraction of the median layer's "
                                                      f"(default {_DEFAULTS.min_angular_rel}).")] = None,
    min_flags: Annotated[int | None, Opt(help="Without causal evidence (a training run): how many correlational "
                                              "signals must fire for a layer to be underused (default: "
                                              f"{VOTE_RULE}).")] = None,
    min_fraction: Annotated[float | None, Opt(help="Fraction of the deep half that must be underused for the "
                                                   f"'underuse' verdict (default {_DEFAULTS.min_fraction}).")] = None,
) -> None:
    """Are the deep layers underused? Verdict and evidence per layer, from training probes or a profile."""
    overrides = {"max_var_rel": max_var_rel, "max_ratio": max_ratio, "min_grad_rel": min_grad_rel,
                 "min_deletion": min_deletion, "min_deletion_rel": min_deletion_rel, "min_angular": min_angular,
                 "min_angular_rel": min_angular_rel, "min_flags": min_flags, "min_fraction": min_fraction}
    thresholds = Thresholds(**{k: v for k, v in overrides.items() if v is not None})
    results = diagnose_runs(read_runs(runs), thresholds, step)
    verdicts = [d.verdict for d in results.values()]
    overall = next(v for v in ("underuse", "inconclusive", "ok", "insufficient data") if v in verdicts)
    if json_out:
        typer.echo(json.dumps({"verdict": overall, "signals": list(SIGNAL_NAMES),
                               "runs": [d.to_dict() for d in results.values()]}, indent=2))
    else:
        for i, d in enumerate(results.values()):
            if i:
                console.print()
            _report(d)
    if strict and overall == "underuse":
        raise typer.Exit(1)

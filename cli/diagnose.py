"""``gpas-probe diagnose``: a verdict on deep-layer underuse, with the evidence per layer.

Into a pipe or a file the evidence table is printed at its natural width and every other line whole,
so that no number or header is cut or folded; in a terminal the table fits the window, folding cells
(never an ellipsis).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gpas_probe.analysis.diagnosis import SIGNAL_NAMES, VOTE_RULE, Diagnosis, Thresholds, diagnose_runs
from gpas_probe.cli.common import console, friendly_errors, print_wide, read_runs

_DEFAULTS = Thresholds()
Opt = typer.Option

#: signal -> (column shown, header, format); causal ones with their bounds
_SHOWN = {
    "deletion": ("deletion_delta", "deletion Δloss [95%]", "{:.3g}"),
    "angular": ("angular", "angle to next [95%]", "{:.3f}"),
    "variance": ("var_rel", "var / layer 0", "{:.3g}"),
    "ratio": ("ratio", "shortcut/branch", "{:.3g}"),
    "grad": ("grad_rel", "grad / shallow", "{:.3g}"),
}
_BOUNDS = {"deletion": ("deletion_lo", "deletion_hi"), "angular": ("angular_lo", "angular_hi")}
_VERDICT_STYLE = {"underuse": "bold red", "ok": "bold green", "inconclusive": "bold yellow",
                  "insufficient data": "bold yellow"}
_STATUS_STYLE = {"underused": "bold red", "used": "green", "inconclusive": "yellow", "no evidence": "dim"}


def _num(value: float, fmt: str) -> str:
    return "-" if value != value else fmt.format(value)


def _cell(row: object, signal: str, bold: bool) -> str:
    column, _, fmt = _SHOWN[signal]
    text = _num(getattr(row, column), fmt)
    if signal in _BOUNDS:
        lo, hi = (getattr(row, c) for c in _BOUNDS[signal])
        if lo == lo and hi == hi:
            text += f" [{fmt.format(lo)}, {fmt.format(hi)}]"
    return f"[bold]{text}[/]" if bold and text != "-" else text


def evidence_table(d: Diagnosis) -> Table:
    """The evidence per layer of the signals used, with each layer's status; cells fold, never end in an
    ellipsis, when the table is narrower than its natural width."""
    used = d.summary["signals_used"]
    decided = d.summary["decided_by"]
    table = Table(title=f"{d.run_id}: evidence per layer (bold: what decided; the deep half below the rule)",
                  title_justify="left")
    table.add_column("layer", justify="right", overflow="fold")
    for s in used:
        table.add_column(_SHOWN[s][1], justify="right", overflow="fold")
    table.add_column("status", justify="left", overflow="fold")
    first_deep = min(d.summary["deep_layers"], default=None)
    for row in d.layers.itertuples(index=False):
        cells = [_cell(row, s, s == decided or (decided == "correlational" and bool(getattr(row, f"flag_{s}"))))
                 for s in used]
        status = f"[{_STATUS_STYLE[row.status]}]{row.status}[/]"
        last_shallow = first_deep is not None and row.layer == first_deep - 1
        table.add_row(str(row.layer), *cells, status, end_section=last_shallow)
    return table


def _say(text: str) -> None:
    """One line of the report: wrapped to a terminal's window, whole into a pipe or a file."""
    console.print(text, highlight=False, soft_wrap=not console.is_terminal)


def _fmt(v: object) -> str:
    return "-" if isinstance(v, float) and not math.isfinite(v) else (f"{v:.4g}" if isinstance(v, float) else str(v))


def _confidence(s: dict) -> str:
    c = s["confidence"]
    if not c["intervals"]:
        return "no intervals recorded: values taken as exact"
    counts = [f"{int(v):,} {name}" for name, v in (("sequences", c["sequences"]), ("tokens", c["tokens"]))
              if isinstance(v, float) and math.isfinite(v)]
    return "95% intervals" + (f" from {', '.join(counts)}" if counts else "")


def _report(d: Diagnosis) -> None:
    s = d.summary
    if s["signals_used"]:
        print_wide(evidence_table(d))
    for finding in s["findings"].values():
        _say(f"[bold]finding:[/] {finding['text']}")
    g = s["growth_factor"]
    if isinstance(g, float) and math.isfinite(g):
        growth = (f"×{g:.4g} per layer (fit log var = a + b·layer, b = {s['growth_rate']:.4g}, "
                  f"R² = {_fmt(s['growth_r2'])})")
    else:
        growth = s["growth_missing"]
    _say(f"variance growth: {growth}; deep-quarter shortcut/branch ratio {_fmt(s['deep_ratio'])}")
    steps = ", ".join(f"{k} @ step {v}" for k, v in s["steps"].items())
    read = ", ".join(f"{k}: {v}" for k, v in s["statistics_read"].items())
    _say(f"signals: {steps or 'none'}" + (f" (read: {read})" if read else ""))
    for name, why in s["signals_missing"].items():
        _say(f"  missing {name}: {why}")
    if agree := s.get("estimate_agreement"):
        _say(f"deletion estimate against exact deletion: Spearman {agree['spearman']:.3f} over "
             f"{agree['layers']} layers (step {agree['step']})")
    deep = s["deep_layers"]
    n_deep = sum(1 for layer in s["underused_layers"] if layer in deep)
    n_open = sum(1 for layer in s["inconclusive_layers"] if layer in deep)
    style = _VERDICT_STYLE[d.verdict]
    if d.verdict == "insufficient data":
        detail = s["reason"]
    else:
        tau = ", ".join(f"{k} below {v:.3g}" for k, v in s["thresholds_used"].items())
        detail = (f"{n_deep} of {len(deep)} deep layers underused, {n_open} inconclusive (underuse needs "
                  f"{s['layers_needed']}); decided by {s['decided_by']}")
        if s["causal"]:
            detail += f" ({tau}; {_confidence(s)})"
        else:
            detail += (" alone: no deletion or angular distance was recorded, so this rests on correlational "
                       "signals; profile a checkpoint (gpas-probe profile) for causal evidence")
    _say(f"[{style}]verdict: {d.verdict}[/] — {detail}")
    if s["advice"]:
        _say(f"to settle it: {s['advice']}")


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

"""``gpas-probe diagnose``: a verdict on deep-layer underuse, with the evidence per layer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gpas_probe.analysis.diagnosis import SIGNALS, Diagnosis, Thresholds, diagnose_runs
from gpas_probe.cli.common import console, friendly_errors
from gpas_probe.store import load_runs

_DEFAULTS = Thresholds()
Opt = typer.Option

#: signal -> (column shown, header, format)
_SHOWN = {
    "variance": ("var_rel", "var / layer 0", "{:.3g}"),
    "ratio": ("ratio", "shortcut/branch", "{:.3g}"),
    "grad": ("grad_rel", "grad / shallow", "{:.3g}"),
    "deletion": ("deletion_delta", "deletion Δloss", "{:.3g}"),
    "angular": ("angular", "angular to next", "{:.3f}"),
}
_VERDICT_STYLE = {"underuse": "bold red", "ok": "bold green", "insufficient data": "bold yellow"}


def _cell(value: float, fmt: str, flagged: bool) -> str:
    if value != value:  # NaN
        return "-"
    text = fmt.format(value)
    return f"[bold red]{text}[/]" if flagged else text


def _table(d: Diagnosis) -> Table:
    used = d.summary["signals_used"]
    table = Table(title=f"{d.run_id}: evidence per layer (red = fires; the deep half below the rule)",
                  title_justify="left")
    table.add_column("layer", justify="right")
    for s in used:
        _, header, _ = _SHOWN[s]
        table.add_column(header, justify="right")
    table.add_column("flags", justify="right")
    table.add_column("underused", justify="center")
    first_deep = min(d.summary["deep_layers"], default=None)
    for row in d.layers.itertuples(index=False):
        cells = [_cell(getattr(row, _SHOWN[s][0]), _SHOWN[s][2], bool(getattr(row, f"flag_{s}"))) for s in used]
        table.add_row(str(row.layer), *cells, f"{row.flags}/{row.signals}",
                      "[bold red]yes[/]" if row.underused else "",
                      end_section=first_deep is not None and row.layer == first_deep - 1)
    return table


def _fmt(v: object) -> str:
    return "-" if isinstance(v, float) and not math.isfinite(v) else (f"{v:.4g}" if isinstance(v, float) else str(v))


def _report(d: Diagnosis) -> None:
    s = d.summary
    if s["signals_used"]:
        console.print(_table(d))
    g = s["growth_factor"]
    if isinstance(g, float) and math.isfinite(g):
        console.print(f"variance growth: ×{g:.4g} per layer (fit log var = a + b·layer, b = {s['growth_rate']:.4g}, "
                      f"R² = {_fmt(s['growth_r2'])}); deep-quarter shortcut/branch ratio {_fmt(s['deep_ratio'])}",
                      highlight=False)
    steps = ", ".join(f"{k} @ step {v}" for k, v in s["steps"].items())
    console.print(f"signals: {steps or 'none'}" + (" (angular from block influence)"
                                                    if s["angular_source"] == "block_influence" else ""),
                  highlight=False)
    for name, why in s["signals_missing"].items():
        console.print(f"  missing {name}: {why}", highlight=False)
    deep = s["deep_layers"]
    n_deep = sum(1 for layer in s["underused_layers"] if layer in deep)
    style = _VERDICT_STYLE[d.verdict]
    if d.verdict == "insufficient data":
        detail = "no per-layer signal recorded" if not s["signals_used"] else "fewer than two layers"
    else:
        th = s["thresholds"]
        detail = (f"{n_deep} of {len(deep)} deep layers ({100 * s['fraction_underused']:.0f}%) underused; "
                  f"a layer is underused when {s['flags_needed']} of its {len(s['signals_used'])} signals fire, "
                  f"the run when {100 * th['min_fraction']:.0f}% of the deep half is")
    console.print(f"[{style}]verdict: {d.verdict}[/] — {detail}", highlight=False)


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
    min_flags: Annotated[int | None, Opt(help="Signals that must fire for a layer to be underused (default: a "
                                              "majority of those recorded, at least 2).")] = None,
    min_fraction: Annotated[float | None, Opt(help="Fraction of the deep half that must be underused for the "
                                                   f"'underuse' verdict (default {_DEFAULTS.min_fraction}).")] = None,
) -> None:
    """Are the deep layers underused? Verdict and evidence per layer, from training probes or a profile."""
    overrides = {"max_var_rel": max_var_rel, "max_ratio": max_ratio, "min_grad_rel": min_grad_rel,
                 "min_deletion": min_deletion, "min_deletion_rel": min_deletion_rel, "min_angular": min_angular,
                 "min_angular_rel": min_angular_rel, "min_flags": min_flags, "min_fraction": min_fraction}
    thresholds = Thresholds(**{k: v for k, v in overrides.items() if v is not None})
    results = diagnose_runs(load_runs(runs), thresholds, step)
    verdicts = [d.verdict for d in results.values()]
    overall = next((v for v in ("underuse", "ok") if v in verdicts), "insufficient data")
    if json_out:
        typer.echo(json.dumps({"verdict": overall, "signals": list(SIGNALS),
                               "runs": [d.to_dict() for d in results.values()]}, indent=2))
    else:
        for i, d in enumerate(results.values()):
            if i:
                console.print()
            _report(d)
    if strict and overall == "underuse":
        raise typer.Exit(1)

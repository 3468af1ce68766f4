"""A diagnosis as a report shows it: the lines ``gpas-probe diagnose`` prints (findings, variance growth,
signals read and missing, the verdict with what decided it, the advice) and its evidence table, in the same
words and with the same headers, as plain text for the page to escape."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpas_probe.analysis.diagnosis import Diagnosis
from gpas_probe.report.tables import Cell, Table, bounds

#: signal -> (column shown, header, format), as ``gpas-probe diagnose`` shows them; causal ones with bounds
SHOWN = {
    "deletion": ("deletion_delta", "deletion Δloss [95%]", "{:.3g}"),
    "angular": ("angular", "angle to next [95%]", "{:.3f}"),
    "variance": ("var_rel", "var / layer 0", "{:.3g}"),
    "ratio": ("ratio", "shortcut/branch", "{:.3g}"),
    "grad": ("grad_rel", "grad / shallow", "{:.3g}"),
}
BOUNDS = {"deletion": ("deletion_lo", "deletion_hi"), "angular": ("angular_lo", "angular_hi")}
#: The order in which runs' verdicts make the overall one (the first present wins), as ``diagnose --json``.
OVERALL_ORDER = ("underuse", "inconclusive", "ok", "insufficient data")


@dataclass
class DiagnosisView:
    """One run's diagnosis in words: ``verdict`` (the word), ``verdict_line`` (``verdict: ... — detail``,
    the summary line), ``lines`` (findings, growth, signals, missing signals, estimate agreement),
    ``advice`` (``to settle it: ...`` or None) and the evidence ``table`` (None without signals)."""

    run_id: str
    verdict: str
    verdict_line: str
    lines: list[str]
    advice: str | None
    table: Table | None


def overall_verdict(verdicts: list[str]) -> str:
    """The verdict over several runs: underuse if any run shows it, else inconclusive, ok, insufficient data."""
    return next(v for v in OVERALL_ORDER if v in verdicts)


def _num(value: float, fmt: str) -> str:
    return "-" if value != value else fmt.format(value)


def _fmt(v: object) -> str:
    return "-" if isinstance(v, float) and not math.isfinite(v) else (f"{v:.4g}" if isinstance(v, float) else str(v))


def _cell(row: object, signal: str, bold: bool) -> Cell:
    column, _, fmt = SHOWN[signal]
    text = _num(getattr(row, column), fmt)
    if signal in BOUNDS:
        lo, hi = (getattr(row, c) for c in BOUNDS[signal])
        if lo == lo and hi == hi:
            text += " " + bounds(lo, hi, fmt)
    return Cell(text, bold=bold and text != "-")


def evidence_table(d: Diagnosis) -> Table:
    """The evidence per layer of the signals used and each layer's status (``style`` = the status); bold: what
    decided; a rule after the last shallow layer."""
    used = d.summary["signals_used"]
    decided = d.summary["decided_by"]
    table = Table(["layer", *(SHOWN[s][1] for s in used), "status"],
                  title=f"{d.run_id}: evidence per layer (bold: what decided; the deep half below the rule)",
                  left={len(used) + 1})
    first_deep = min(d.summary["deep_layers"], default=None)
    for row in d.layers.itertuples(index=False):
        cells = [_cell(row, s, s == decided or (decided == "correlational" and bool(getattr(row, f"flag_{s}"))))
                 for s in used]
        last_shallow = first_deep is not None and row.layer == first_deep - 1
        table.add(str(row.layer), *cells, Cell(str(row.status), style=str(row.status)), rule=last_shallow)
    return table


def _confidence(s: dict) -> str:
    c = s["confidence"]
    if not c["intervals"]:
        return "no intervals recorded: values taken as exact"
    counts = [f"{int(v):,} {name}" for name, v in (("sequences", c["sequences"]), ("tokens", c["tokens"]))
              if isinstance(v, float) and math.isfinite(v)]
    return "95% intervals" + (f" from {', '.join(counts)}" if counts else "")


def verdict_line(d: Diagnosis) -> str:
    """``verdict: WORD — detail``: how many deep layers are underused and what decided, or why the data do
    not suffice."""
    s = d.summary
    deep = s["deep_layers"]
    n_deep = sum(1 for layer in s["underused_layers"] if layer in deep)
    n_open = sum(1 for layer in s["inconclusive_layers"] if layer in deep)
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
    return f"verdict: {d.verdict} — {detail}"


def diagnosis_lines(d: Diagnosis) -> list[str]:
    """The lines ``gpas-probe diagnose`` prints between the table and the verdict."""
    s = d.summary
    lines = [f"finding: {finding['text']}" for finding in s["findings"].values()]
    g = s["growth_factor"]
    if isinstance(g, float) and math.isfinite(g):
        growth = (f"×{g:.4g} per layer (fit log var = a + b·layer, b = {s['growth_rate']:.4g}, "
                  f"R² = {_fmt(s['growth_r2'])})")
    else:
        growth = s["growth_missing"]
    lines.append(f"variance growth: {growth}; deep-quarter shortcut/branch ratio {_fmt(s['deep_ratio'])}")
    steps = ", ".join(f"{k} @ step {v}" for k, v in s["steps"].items())
    read = ", ".join(f"{k}: {v}" for k, v in s["statistics_read"].items())
    lines.append(f"signals: {steps or 'none'}" + (f" (read: {read})" if read else ""))
    lines.extend(f"missing {name}: {why}" for name, why in s["signals_missing"].items())
    if agree := s.get("estimate_agreement"):
        lines.append(f"deletion estimate against exact deletion: Spearman {agree['spearman']:.3f} over "
                     f"{agree['layers']} layers (step {agree['step']})")
    return lines


def diagnosis_view(d: Diagnosis) -> DiagnosisView:
    """Everything a report shows of one run's diagnosis."""
    s = d.summary
    return DiagnosisView(run_id=d.run_id, verdict=d.verdict, verdict_line=verdict_line(d),
                         lines=diagnosis_lines(d), advice=f"to settle it: {s['advice']}" if s["advice"] else None,
                         table=evidence_table(d) if s["signals_used"] else None)

"""A :class:`~gpas_probe.report.content.Report` as one self-contained HTML page: the styles inline, the
figures as data URIs or inline SVG, no script, no font or file fetched to view it. Every string that comes
from the data (run ids, paths, metadata, messages) is HTML-escaped here; the only markup not written by
this module is the figures' SVG, which matplotlib escapes. Narrow screens: a viewport tag, figures at most
the page's width, and tables that scroll sideways inside their own box instead of widening the page."""

from __future__ import annotations

import json
from html import escape

from gpas_probe.report.content import Report, RunView
from gpas_probe.report.figures import FigureView
from gpas_probe.report.tables import Cell, Table
from gpas_probe.report.verdicts import DiagnosisView

#: The page's ids of the sections, in order, with their headings.
SECTIONS = {"runs": "Runs and profiles", "diagnosis": "Diagnosis", "comparison": "Comparison",
            "figures": "Figures", "commands": "Regenerate"}

CSS = """
*,*::before,*::after{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:#1d2329;background:#fff}
main{max-width:1180px;margin:0 auto;padding:1rem 1.25rem 3rem}
h1{font-size:1.6rem;margin:.5rem 0 .25rem;overflow-wrap:anywhere}
h2{font-size:1.3rem;margin:2rem 0 .6rem;padding-bottom:.2rem;border-bottom:2px solid #e3e7eb}
h3{font-size:1.05rem;margin:1.4rem 0 .4rem;overflow-wrap:anywhere}
p,li{overflow-wrap:anywhere}
nav ul{list-style:none;padding:0;margin:.5rem 0;display:flex;flex-wrap:wrap;gap:.35rem .9rem}
a{color:#0b5cad}
.muted{color:#5c6670;font-size:.9rem}
.table-wrap{overflow-x:auto;-webkit-overflow-scrolling:touch;width:fit-content;max-width:100%;margin:.4rem 0 .8rem;
border:1px solid #e3e7eb;border-radius:6px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:.88rem}
caption{caption-side:top;text-align:left;padding:.4rem .6rem;font-weight:600;white-space:normal}
th,td{padding:.28rem .65rem;border-bottom:1px solid #eef1f3;white-space:nowrap;text-align:right;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
th.left,td.left{text-align:left}
table.facts td{white-space:normal;overflow-wrap:anywhere;min-width:11rem;max-width:28rem}
table.facts td:first-child{min-width:0;white-space:nowrap}
.chip{display:inline-block;white-space:nowrap;margin:0 .9rem .3rem 0}
tr.rule td{border-bottom:2px solid #5c6670}
td.underused{color:#b3261e;font-weight:700}
td.used{color:#1a7f37}
td.inconclusive{color:#9a6700}
td.no-evidence{color:#8c959f}
.verdict{display:inline-block;padding:.15rem .6rem;border-radius:999px;font-weight:700;color:#fff}
.v-underuse{background:#b3261e}.v-ok{background:#1a7f37}.v-inconclusive,.v-insufficient-data{background:#9a6700}
p.summary{margin:.4rem 0;font-weight:600}
ul.lines{margin:.3rem 0;padding-left:1.2rem}
figure{margin:1rem 0 1.8rem}
figure img,figure svg{display:block;max-width:100%;height:auto;border:1px solid #eef1f3}
figcaption{margin-top:.4rem}
pre{overflow-x:auto;background:#f6f8fa;border:1px solid #e3e7eb;border-radius:6px;padding:.5rem .7rem;
font-size:.82rem;line-height:1.45}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.85em}
figcaption code,li code{overflow-wrap:anywhere}
details{margin:.4rem 0}
@media (max-width:640px){
body{font-size:14px}
main{padding:.6rem .7rem 2rem}
h1{font-size:1.3rem}
h2{font-size:1.12rem}
th,td{padding:.22rem .45rem}
}
"""


def _text(value: object) -> str:
    return escape(str(value), quote=True)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def render_table(table: Table, css_class: str = "") -> str:
    """A table inside a box that scrolls sideways when it is wider than the screen."""
    head = "".join(f'<th class="left">{_text(c)}</th>' if i in table.left else f"<th>{_text(c)}</th>"
                   for i, c in enumerate(table.columns))
    body = []
    for r, row in enumerate(table.rows):
        cells = []
        for i, cell in enumerate(row):
            classes = " ".join(x for x in ("left" if i in table.left else "", _slug(cell.style)) if x)
            text = f"<strong>{_text(cell.text)}</strong>" if cell.bold else _text(cell.text)
            cells.append(f'<td class="{classes}">{text}</td>' if classes else f"<td>{text}</td>")
        body.append(f'<tr class="rule">{"".join(cells)}</tr>' if r in table.rules else f"<tr>{''.join(cells)}</tr>")
    caption = f"<caption>{_text(table.title)}</caption>" if table.title else ""
    cls = f' class="{css_class}"' if css_class else ""
    return (f'<div class="table-wrap"><table{cls}>{caption}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def facts_table(runs: list[RunView]) -> Table:
    """The runs' facts side by side: one row per fact (in the order they first come), one column per run."""
    keys = list(dict.fromkeys(k for r in runs for k, _ in r.facts if k != "run"))
    table = Table(["", *(r.label for r in runs)], left=set(range(len(runs) + 1)))
    for key in keys:
        values = [dict(r.facts).get(key, "-") for r in runs]
        table.add(Cell(key, bold=True), *values)
    return table


def _badge(verdict: str) -> str:
    return f'<span class="verdict v-{_slug(verdict)}">{_text(verdict)}</span>'


def _lines(lines: list[str]) -> str:
    return f'<ul class="lines">{"".join(f"<li>{_text(x)}</li>" for x in lines)}</ul>' if lines else ""


def _diagnosis(i: int, d: DiagnosisView) -> str:
    parts = [f'<article class="diagnosis" id="diagnosis-{i}"><h3>{_text(d.run_id)} {_badge(d.verdict)}</h3>',
             f'<p class="summary">{_text(d.verdict_line)}</p>']
    if d.advice:
        parts.append(f'<p class="advice">{_text(d.advice)}</p>')
    if d.table is not None:
        parts.append(render_table(d.table, "evidence"))
    parts.append(_lines(d.lines))
    return "".join(parts) + "</article>"


def _figure(f: FigureView) -> str:
    if f.fmt == "png":
        image = f'<img src="{_text(f.image)}" alt="{_text(f.kind)} figure of {_text(", ".join(f.runs))}">'
    else:
        image = f.image  # matplotlib's SVG: its texts are escaped there
    return (f'<figure class="figure" id="figure-{_slug(f.kind)}" data-kind="{_text(f.kind)}">{image}'
            f"<figcaption><strong>{_text(f.kind)}</strong>: {_text(f.caption)}<br>"
            f"<code>{_text(f.command)}</code></figcaption></figure>")


def _glance(report: Report) -> str:
    """Each run's verdict (and the overall one over several), for the page's head."""
    chips = [("overall", report.verdict)] if len(report.diagnoses) > 1 else []
    chips += [(d.run_id, d.verdict) for d in report.diagnoses]
    return " ".join(f'<span class="chip">{_text(name)} {_badge(verdict)}</span>' for name, verdict in chips)


def render_html(report: Report) -> str:
    """The whole page."""
    shown = [s for s in SECTIONS if s != "comparison" or report.comparison is not None]
    nav = "".join(f'<li><a href="#{s}">{_text(SECTIONS[s])}</a></li>' for s in shown)
    runs = render_table(facts_table(report.runs), "facts") + "".join(
        f'<details id="run-{i}"><summary>all probe metadata of {_text(r.label)} ({_text(r.kind)})</summary>'
        f"<pre><code>{_text(json.dumps(r.meta, indent=2, default=str))}</code></pre></details>"
        for i, r in enumerate(report.runs, 1))
    diagnoses = "".join(_diagnosis(i, d) for i, d in enumerate(report.diagnoses, 1))
    sections = {
        "runs": runs,
        "diagnosis": f'<p class="overall">overall: {_badge(report.verdict)}</p>{diagnoses}',
        "comparison": (render_table(report.comparison, "comparison") + _lines(report.comparison_lines)
                       if report.comparison is not None else ""),
        "figures": "".join(_figure(f) for f in report.figures) + (
            '<h3>Left out</h3><ul class="left-out">' + "".join(
                f"<li><strong>{_text(x.kind)}</strong>: {_text(x.reason)} (<code>{_text(x.command)}</code>)</li>"
                for x in report.left_out) + "</ul>" if report.left_out else ""),
        "commands": (f'<p>Each piece again, from <code>{_text(report.cwd)}</code> (the folder this report was made '
                     "from; the paths are as they were given):</p>"
                     + "".join(f'<p class="muted">{_text(c.what)}</p><pre><code class="command">'
                               f"{_text(c.command)}</code></pre>" for c in report.commands)),
    }
    body = "".join(f'<section id="{s}"><h2>{_text(SECTIONS[s])}</h2>{sections[s]}</section>' for s in shown)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="gpas-probe {_text(report.version)}">\n'
        f"<title>{_text(report.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<header><h1>{_text(report.title)}</h1>"
        f'<p class="muted">made {_text(report.created)} by gpas-probe {_text(report.version)}; '
        f"{len(report.runs)} run(s), {len(report.figures)} figure(s)</p>"
        f'<p class="glance">{_glance(report)}</p>'
        f"<nav><ul>{nav}</ul></nav></header>\n"
        f"{body}\n</main>\n</body>\n</html>\n")

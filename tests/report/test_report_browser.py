"""A report in a real browser: headless Chromium renders it at a phone's width (390 px) and a desktop's
(1280 px) with every host name unresolvable, and the screenshots are pictures, not blank pages; at both
widths the page is no wider than the screen (wide tables scroll inside their own box), as a script added to a
copy of the page shows in the screenshot.

Headless Chromium lays a window out at least 500 px wide (a ``--window-size`` of 390 only crops the picture),
so the page is shown in a frame exactly as wide as the screen, as responsive-design previews do: inside the
frame the page's width and its media queries are those of the screen.

Skipped where no Chromium or Chrome is on PATH (``apt-get install chromium`` on Debian)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from typer.testing import CliRunner

from gpas_probe.cli.main import app

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((path for path in map(shutil.which, BROWSERS) if path), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium, chromium-browser or google-chrome on PATH "
                                                        "(Debian: apt-get install chromium)")
WIDTHS = {"phone": 390, "desktop": 1280}
HEIGHT = 2000
#: Appended to a copy of the page: once everything has loaded, two squares at the top left of the screen say
#: (green, else red) whether the screen (the frame) is as wide as asked (``{width}``) and whether the page fits in it.
MEASURE = """<script>addEventListener('load', () => {{
  const square = (left, ok) => {{
    const d = document.createElement('div');
    d.style.cssText = 'position:fixed;top:0;width:40px;height:40px;z-index:99999;left:' + left + 'px;background:'
      + (ok ? '#00ff00' : '#ff0000');
    document.body.appendChild(d);
  }};
  square(0, innerWidth === {width});
  square(60, document.documentElement.scrollWidth <= innerWidth);
}});</script>"""
GREEN, RED = (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)


def _browser(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    assert BROWSER is not None
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
               "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing can be fetched: the page must not need to
               f"--user-data-dir={tmp / 'browser-profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def screenshot(page: Path, shot: Path, width: int, height: int, tmp: Path) -> subprocess.CompletedProcess:
    """``page`` at a screen ``width`` px wide (in a frame that wide, at the top left), as a PNG ``height`` high."""
    frame = tmp / f"frame-{width}.html"
    frame.write_text("<!DOCTYPE html><html><head><style>html,body{margin:0}iframe{border:0;display:block}</style>"
                     f'</head><body><iframe src="{page.as_uri()}" width="{width}" height="{height}"></iframe>'
                     "</body></html>", encoding="utf-8")
    return _browser(tmp, f"--screenshot={shot}", "--virtual-time-budget=5000", f"--window-size={width},{height}",
                    frame.as_uri())


def _squares(tmp: Path, html: str, width: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The colours of the two squares of :data:`MEASURE` on ``html`` at a screen ``width`` px wide."""
    probe = tmp / "measured.html"
    probe.write_text(html.replace("</body>", MEASURE.format(width=width) + "</body>"), encoding="utf-8")
    shot = tmp / "measured.png"
    res = screenshot(probe, shot, width, 400, tmp)
    assert shot.is_file(), res.stderr[-3000:]
    pixels = mpimg.imread(shot)[..., :3]
    return tuple(np.round(pixels[20, 20], 2).tolist()), tuple(np.round(pixels[20, 80], 2).tolist())


@pytest.fixture(scope="module")
def page(made, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "report.html"
    res = CliRunner().invoke(app, ["report", str(made.pre), str(made.gpas), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("screen", list(WIDTHS))
def test_screenshots_are_not_blank(page: Path, tmp_path: Path, screen: str) -> None:
    shot = tmp_path / f"{screen}.png"
    res = screenshot(page, shot, WIDTHS[screen], HEIGHT, tmp_path)
    assert shot.is_file() and shot.stat().st_size > 5000, res.stderr[-3000:]
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (HEIGHT, WIDTHS[screen])
    ink = (pixels < 0.9).any(axis=-1)  # not white: text, rules, figures
    assert pixels.std() > 0.05 and 0.02 < ink.mean() < 0.9
    assert ink[: HEIGHT // 4].any(axis=1).mean() > 0.2  # the head of the page has lines of text
    colourful = (pixels.max(axis=-1) - pixels.min(axis=-1)) > 0.25  # the verdict badges and the figures
    assert colourful.mean() > 0.001


@pytest.mark.parametrize("screen", list(WIDTHS))
def test_the_page_is_no_wider_than_the_screen(page: Path, tmp_path: Path, screen: str) -> None:
    window, fits = _squares(tmp_path, page.read_text(encoding="utf-8"), WIDTHS[screen])
    assert window == GREEN, f"the window is not {WIDTHS[screen]} px wide: the measurement means nothing"
    assert fits == GREEN, f"the page is wider than a {WIDTHS[screen]} px screen"


def test_the_measurement_can_fail(tmp_path: Path) -> None:
    """A page with a wide table outside a scrolling box is wider than a phone."""
    cells = "".join(f"<td>cell number {i}</td>" for i in range(40))
    wide = ('<!DOCTYPE html><html><head><meta name="viewport" content="width=device-width"><title>t</title>'
            f"</head><body><table><tr>{cells}</tr></table></body></html>")
    assert _squares(tmp_path, wide, WIDTHS["phone"]) == (GREEN, RED)

"""What the report tests share: tiny training runs and their profiles made through the CLI (once per session),
and a parser that reads a report page back into its parts with the standard library's html.parser."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import write_corpus
from typer.testing import CliRunner

from gpas_probe.cli.main import app

runner = CliRunner()


def ok(args: list[str]) -> str:
    """Run the CLI; its output, after checking that it exited 0."""
    res = runner.invoke(app, [str(a) for a in args], terminal_width=200)
    assert res.exit_code == 0, res.output
    return res.output


@dataclass
class Made:
    root: Path
    corpus: Path
    pre: Path  # a Pre-LN run, probes on steps 1, 2, 4, final checkpoint only
    gpas: Path  # a Pre+GPAS run, checkpoints at steps 2 and 4
    profiles: Path  # profiles/pre (one step), profiles/gpas (two steps)


@pytest.fixture(scope="session")
def made(tmp_path_factory) -> Made:
    root = tmp_path_factory.mktemp("report")
    corpus = write_corpus(root, seed=1, words=3000)
    common = ["--preset", "tiny", "--steps", "4", "--probe-every", "2", "--eval-every", "2", "--data", corpus]
    ok(["train", *common, "--out", root / "runs" / "pre"])
    ok(["train", *common, "--gpas", "--checkpoint-every", "2", "--out", root / "runs" / "gpas"])
    ok(["profile", root / "runs" / "pre", root / "runs" / "gpas", "--out", root / "profiles", "--batches", "1",
        "--data", corpus])
    return Made(root, corpus, root / "runs" / "pre", root / "runs" / "gpas", root / "profiles")


@dataclass
class Page:
    """A report page read back: what each test asserts on."""

    doctype: bool = False
    tags: list[str] = field(default_factory=list)  # every start tag, in order
    attrs: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (tag, attributes) of every start tag
    text: str = ""  # all text, tags removed, entities decoded
    sections: dict[str, str] = field(default_factory=dict)  # section id -> its text
    tables: list[dict] = field(default_factory=list)  # {'class', 'caption', 'header', 'rows'} per table
    commands: list[str] = field(default_factory=list)  # the regenerate commands, as text
    figures: list[str] = field(default_factory=list)  # data-kind of every <figure>
    summaries: list[str] = field(default_factory=list)  # the verdict lines

    def count(self, tag: str) -> int:
        return self.tags.count(tag)

    def attr_values(self, *names: str) -> list[str]:
        return [v for _, a in self.attrs for k, v in a.items() if k in names and v is not None]


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.texts: list[str] = []
        self.section: str | None = None
        self.section_text: list[str] = []
        self.table: dict | None = None
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.capture: list[str] | None = None  # text of a command or a summary
        self.capture_kind = ""

    def handle_decl(self, decl: str) -> None:
        self.page.doctype = self.page.doctype or decl.lower() == "doctype html"

    def handle_starttag(self, tag: str, attrs) -> None:
        a = {k: (v if v is not None else "") for k, v in attrs}
        self.page.tags.append(tag)
        self.page.attrs.append((tag, a))
        if tag not in VOID:
            self.stack.append((tag, a))
        classes = a.get("class", "").split()
        if tag == "section":
            self.section, self.section_text = a.get("id", ""), []
        elif tag == "table":
            self.table = {"class": a.get("class", ""), "caption": "", "header": [], "rows": []}
        elif tag == "tr" and self.table is not None:
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.cell = []
        elif tag == "figure":
            self.page.figures.append(a.get("data-kind", ""))
        elif (tag == "code" and "command" in classes) or (tag == "p" and "summary" in classes):
            self.capture, self.capture_kind = [], tag
        elif tag == "caption":
            self.capture, self.capture_kind = [], "caption"

    def handle_endtag(self, tag: str) -> None:
        if tag == "section" and self.section is not None:
            self.page.sections[self.section] = "".join(self.section_text)
            self.section = None
        elif tag in ("td", "th") and self.cell is not None and self.row is not None:
            self.row.append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tr" and self.row is not None and self.table is not None:
            if not self.table["header"] and self.row and not self.table["rows"] and self._in_thead():
                self.table["header"] = self.row
            else:
                self.table["rows"].append(self.row)
            self.row = None
        elif tag == "table" and self.table is not None:
            self.page.tables.append(self.table)
            self.table = None
        elif self.capture is not None and tag == self.capture_kind:
            text = "".join(self.capture)
            if tag == "code":
                self.page.commands.append(text)
            elif tag == "p":
                self.page.summaries.append(text)
            elif self.table is not None:
                self.table["caption"] = text
            self.capture = None
        if self.stack and self.stack[-1][0] == tag:
            self.stack.pop()

    def _in_thead(self) -> bool:
        return any(t == "thead" for t, _ in self.stack)

    def handle_data(self, data: str) -> None:
        self.texts.append(data)
        if self.section is not None:
            self.section_text.append(data)
        if self.cell is not None:
            self.cell.append(data)
        if self.capture is not None:
            self.capture.append(data)


def parse_page(html: str) -> Page:
    reader = _Reader()
    reader.feed(html)
    reader.close()
    reader.page.text = "".join(reader.texts)
    return reader.page


@pytest.fixture
def read_page():
    """``read_page(path) -> Page``."""
    return lambda path: parse_page(Path(path).read_text(encoding="utf-8"))

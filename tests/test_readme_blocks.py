"""Every code block of the README runs, or says why not.

Each fenced block whose info string is ``bash``, ``sh``, ``console`` or ``python`` either runs here, or the line
right before its opening fence is ``<!-- readme-blocks: not run: REASON -->`` with a non-empty reason. Blocks
without a language or marked ``text`` are output, not code; any other info string fails (so that a new kind of
block is decided on, not skipped).

The blocks run in README order in one temporary folder, as a reader pasting them in order would: later blocks
read what earlier ones wrote (``runs/demo/pre`` ...). Bash blocks run one command line at a time with ``bash
-euo pipefail`` and must exit 0 (or the code the line's comment gives, ``# ... exit code N``); Python blocks are
executed in a fresh namespace. The README's commands are sized for real use, so every block first goes through
:data:`SUBSTITUTIONS`, a short explicit list of textual replacements that shrink the work and nothing else.

The blocks are run once, by a module fixture; one test per block reports that block's result.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from helpers import write_corpus

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

CODE = {"bash", "sh", "console", "python"}  # run, or carry a not-run marker
OUTPUT = {"", "text"}  # printed output, never run
MARKER = "<!-- readme-blocks: not run:"
MARKER_RE = re.compile(r"<!-- readme-blocks: not run: (?P<reason>\S.*?)\s*-->")
FENCE_RE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")
HEADING_RE = re.compile(r"^#{1,6}\s+(?P<title>.*?)\s*#*\s*$")
EXIT_CODE_RE = re.compile(r"#.*\bexit code (?P<code>\d+)")  # a line's comment naming the code it must exit with

#: (old, new): applied in this order to the text of every block that runs (and to the set-up block's
#: ``gpas-probe demo``), where ``old`` is not followed by more of a word or number (``--step 100`` leaves
#: ``--step 1000`` alone). Each must be used at least once (``test_every_substitution_is_used``).
SUBSTITUTIONS: list[tuple[str, str]] = [
    # The demo trains two 24-layer models for 300 steps; 6 tiny steps still give 3 kept checkpoints (every
    # steps // 3: 2, 4, 6), validation, and recorded probe steps 1, 2, 3, 6 (log-spaced early steps).
    ("gpas-probe demo", "gpas-probe demo --preset tiny --steps 6"),
    # 24 layers x 64 wide -> 4 layers x 32 wide (tiny's default 20 steps, batch 4 x 32, where none is given).
    ("--preset small", "--preset tiny"),
    # Mix-LN's default is L // 4 post layers: 6 of small's 24, 1 of tiny's 4 (6 is refused beyond 4 layers).
    ("--post-layers 6", "--post-layers 1"),
    # 300 -> 4 and 600 -> 8 steps: the resume of runs/pre-gpas still extends it (8 > 4).
    ("--steps 300", "--steps 4"),
    ("--steps 600", "--steps 8"),
    # 50 of small's 300 steps keeps 6 checkpoints; 4 of tiny's 20 keeps 5, of which --keep-last 3 keeps 3.
    ("--checkpoint-every 50", "--checkpoint-every 4"),
    # The deep half of small's 24 layers is 12-23; tiny has 4, its deep half is 2-3.
    ("--layers 12-23", "--layers 2-3"),
    # Step 100 is recorded by the 300-step demo (every 25); the 6-step demo records 1, 2, 3 and 6.
    ("--step 100", "--step 6"),
    # The Python API example's 300 training steps (tests/test_readme_example.py cuts them to 3 as well).
    ("steps=300", "steps=3"),
]

#: Blocks the README gets wrong, by test id: xfail(strict=True), so that they show and are fixed in the README.
README_ERRORS: dict[str, str] = {}


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


def _files(*names: str):
    def check(cwd: Path) -> None:
        missing = [n for n in names if not (cwd / n).is_file()]
        assert not missing, f"missing: {missing}"
    return check


def _command_line(cwd: Path) -> None:
    assert _checkpoints(cwd / "runs/kept")[-3:] == _checkpoints(cwd / "runs/kept") == [
        "step_000012", "step_000016", "step_000020"], _checkpoints(cwd / "runs/kept")  # the last 3 of 5
    assert _checkpoints(cwd / "runs/pre-gpas")[-1] == "step_000008"  # the resume extended the 4-step run
    assert all((cwd / f"runs/pre-gpas-seed{s}/run.json").is_file() for s in range(3))


#: What a block leaves behind, beyond its exit codes (by test id; a check for a block that is gone fails).
AFTER = {
    "command-line-1": _command_line,
    "figures-from-the-command-line-and-from-python-1": _files(
        "variance.png", *(f"runs/demo/figures/{k}.png" for k in ("variance", "ratio", "grad", "gates", "loss")),
        "runs/demo/pre/figures/heatmap.png"),
    "figures-from-the-command-line-and-from-python-2": _files("ratio.png"),
    "seeds-is-a-difference-more-than-noise-1": _files("docs/seeds/seeds-loss.png"),
    "profiling-a-checkpoint-layer-importance-and-a-diagnosis-1": _files(
        "importance.png", "angular.png", "over-training.png"),
}

#: Files the README tells the reader to provide; created in the shared folder before any block runs.
READER_FILES = {"notes.txt": "a text of a few thousand words (the profile examples' --data notes.txt)"}

TIMEOUT = 600  # seconds for one command


@dataclass(frozen=True)
class Block:
    index: int  # among all fenced blocks
    line: int  # 1-based line of the opening fence
    lang: str
    heading: str
    code: str
    before: str  # the line right before the opening fence

    @property
    def reason(self) -> str | None:
        m = MARKER_RE.fullmatch(self.before.strip())
        return m.group("reason") if m else None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "top"


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text`` with its info string's first word and the heading above it."""
    lines = text.split("\n")
    blocks, heading, i = [], "", 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if m is None:
            h = HEADING_RE.match(lines[i])
            if h:
                heading = h.group("title")
            i += 1
            continue
        fence, start = m.group("fence"), i
        i += 1
        while i < len(lines) and not (lines[i].rstrip().startswith(fence) and set(lines[i].rstrip()) == {fence[0]}):
            i += 1  # the closing fence: the opening one's character, at least as many times, nothing else
        assert i < len(lines), f"README.md:{start + 1}: a code fence that is never closed"
        info = m.group("info").split()
        blocks.append(Block(len(blocks), start + 1, info[0].lower() if info else "", heading,
                            "\n".join(lines[start + 1:i]) + "\n", lines[start - 1] if start else ""))
        i += 1
    return blocks


def _ids(blocks: list[Block]) -> dict[int, str]:
    """A test id per block: the slug of its heading and its number among the code blocks under it."""
    ids, seen = {}, {}
    for b in blocks:
        if b.lang in CODE:
            slug = _slug(b.heading)
            seen[slug] = seen.get(slug, 0) + 1
            ids[b.index] = f"{slug}-{seen[slug]}"
    return ids


def substitute(code: str, used: dict[str, int] | None = None) -> str:
    for old, new in SUBSTITUTIONS:
        code, n = re.subn(re.escape(old) + r"(?![\w.-])", lambda _, new=new: new, code)
        if used is not None:
            used[old] = used.get(old, 0) + n
    return code


BLOCKS = parse_blocks(README.read_text())
IDS = _ids(BLOCKS)
CODE_BLOCKS = [b for b in BLOCKS if b.lang in CODE]


def _commands(block: Block) -> list[str]:
    """The command lines of a shell block (``\\`` continuations joined; ``$ `` prompts of a console block)."""
    lines = block.code.splitlines()
    if block.lang == "console":
        lines = [ln[2:] if ln.startswith("$ ") else ln[2:] if ln.startswith("> ") else None for ln in lines]
        lines = [ln for ln in lines if ln is not None]
    commands, current = [], ""
    for ln in lines:
        current += ln
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.strip().startswith("#"):
            commands.append(current)
        current = ""
    return commands


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(MPLBACKEND="Agg", COLUMNS="200")
    return env


def _run_shell(commands: list[str], cwd: Path) -> str | None:
    """Run each command; None when each exited as expected, else what went wrong."""
    for cmd in commands:
        expected = int(m.group("code")) if (m := EXIT_CODE_RE.search(cmd)) else 0
        t0 = time.perf_counter()
        try:
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=cwd, env=_env(), capture_output=True,
                                 text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            return f"$ {cmd}\ntimed out after {TIMEOUT} s"
        if res.returncode != expected:
            return (f"$ {cmd}\nexit code {res.returncode} (expected {expected}) after {time.perf_counter() - t0:.1f} s"
                    f"\n--- stdout ---\n{res.stdout[-4000:]}\n--- stderr ---\n{res.stderr[-4000:]}")
    return None


def _run_python(block: Block, code: str, cwd: Path) -> str | None:
    before = Path.cwd()
    os.chdir(cwd)
    try:
        exec(compile(code, f"README.md:{block.line + 1}", "exec"), {"__name__": "__readme__"})
    except (Exception, SystemExit):  # the block's failure is its test's message
        return traceback.format_exc()
    finally:
        plt.close("all")
        os.chdir(before)
    return None


def _setup_demo(block: Block) -> list[str]:
    """The ``gpas-probe demo`` of the set-up block (not run as a whole: it installs and runs the test suite)."""
    return [seg.split("#")[0].strip() for seg in block.code.replace("\n", "&&").split("&&")
            if seg.strip().startswith("gpas-probe demo")]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, str | None]:
    """Run every block that runs, in README order, in one folder; each block's None (passed) or failure."""
    cwd = tmp_path_factory.mktemp("readme")
    for name in READER_FILES:  # the files the README asks the reader to provide
        write_corpus(cwd, seed=3, words=4000).rename(cwd / name)
    out: dict[int, str | None] = {}
    failed: list[str] = []
    for b in CODE_BLOCKS:
        t0 = time.perf_counter()
        if b.reason is not None:
            commands = _setup_demo(b)
            if not commands:
                continue
            error = _run_shell([substitute(c) for c in commands], cwd)
        elif b.lang == "python":
            error = _run_python(b, substitute(b.code), cwd)
        else:
            error = _run_shell([substitute(c) for c in _commands(b)], cwd)
        if not error and IDS[b.index] in AFTER:
            try:
                AFTER[IDS[b.index]](cwd)
            except AssertionError as e:
                error = f"the block ran, but left the wrong files: {e}"
        print(f"{IDS[b.index]}: {time.perf_counter() - t0:.1f} s, {'failed' if error else 'ok'}")
        if error and failed:
            error += f"\n(earlier blocks failed too: {', '.join(failed)})"
        if error:
            failed.append(IDS[b.index])
        out[b.index] = error
    return out


def _params():
    for b in CODE_BLOCKS:
        marks = []
        if IDS[b.index] in README_ERRORS:
            marks.append(pytest.mark.xfail(strict=True, reason=README_ERRORS[IDS[b.index]]))
        yield pytest.param(b, id=IDS[b.index], marks=marks)


@pytest.mark.parametrize("block", list(_params()))
def test_readme_block(block: Block, results):
    """A block that runs exits as expected; one that does not says why on the line before its fence."""
    if block.reason is None:
        assert MARKER not in block.before, (
            f"README.md:{block.line - 1}: a malformed marker (an empty reason?): {block.before!r}")
        assert block.index in results
    else:
        for path in re.findall(r"tests/[\w/.-]+\.py", block.reason):  # the tests it names exist
            assert (ROOT / path).is_file(), f"README.md:{block.line - 1}: the marker names {path}, which is missing"
    error = results.get(block.index)
    assert error is None, f"README.md:{block.line} ({block.lang}, under '{block.heading}'):\n{error}"


def test_every_check_and_known_error_names_a_block():
    stale = sorted((set(AFTER) | set(README_ERRORS)) - set(IDS.values()))
    assert not stale, f"AFTER or README_ERRORS name blocks that are gone: {stale}"


def test_every_fence_is_code_or_output():
    unknown = [(b.line, b.lang) for b in BLOCKS if b.lang not in CODE | OUTPUT]
    assert not unknown, f"fenced blocks with an info string neither run nor known as output: {unknown}"
    assert len(CODE_BLOCKS) >= 10


def test_every_marker_sits_on_a_code_block():
    """A not-run marker is the line right before the opening fence of a code block, and nowhere else."""
    lines = README.read_text().split("\n")
    marked = {b.line - 1 for b in CODE_BLOCKS if b.reason is not None}  # 1-based, as the lines below
    stray = [n for n, ln in enumerate(lines, 1) if "readme-blocks:" in ln and n not in marked]
    assert not stray, f"README.md lines {stray}: a readme-blocks marker not right before a code block's fence"


def test_every_substitution_is_used():
    used: dict[str, int] = {}
    for b in CODE_BLOCKS:
        if b.reason is None:
            substitute(b.code, used)
        else:
            for c in _setup_demo(b):
                substitute(c, used)
    unused = [old for old, _ in SUBSTITUTIONS if not used.get(old)]
    assert not unused, f"substitutions no block needs any more (remove them): {unused}"


def test_set_up_block_is_what_ci_runs():
    """The set-up block is not run here (it installs, then runs every test); .ci/run runs its commands on a fresh
    clone, and the fixture runs its ``gpas-probe demo``."""
    setup = [b for b in CODE_BLOCKS if b.reason is not None and _setup_demo(b)]
    assert len(setup) == 1 and setup[0].reason is not None
    ci = (ROOT / ".ci" / "run").read_text()
    for args in re.findall(r"pip install (.+?)(?:\s*&&|\s*#|\n)", setup[0].code):
        assert f"pip install -q {args.strip()}" in ci, f".ci/run does not run the README's pip install {args}"
    for line in setup[0].code.splitlines():
        if line.startswith("python -m pytest"):
            assert shlex.split(line.split("#")[0]) == ["python", "-m", "pytest", "-q"]
            assert "\npython -m pytest -q\n" in ci

"""Bad input to the CLI: one ``error:`` line, exit code 2, no traceback, and an existing run left
byte for byte as it was. Each case is a row of the README's table of bad inputs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import write_corpus
from typer.testing import CliRunner

from gpas_probe.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"), seed=2, words=3000)


def _train(out: Path, data: Path | str, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--steps", "2", "--seq-len", "16", "--probe-every", "1", "--data", str(data),
            "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, text: Path) -> Path:
    """A finished run (2 steps, probes every step, a checkpoint at step 2)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    res = runner.invoke(app, _train(out, text))
    assert res.exit_code == 0, res.output
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_npy(path: Path, values, dtype=np.int64) -> Path:
    np.save(path, np.asarray(values, dtype=dtype))
    return path


def _chunk(run: Path) -> Path:
    return sorted((run / "probes").glob("part-*.parquet"))[0]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# Each case: (set-up(tmp, run, text) -> CLI args, what the one error line says). ``run`` is a copy of a
# finished run; where a case reads or resumes it, the copy must be unchanged afterwards.
Case = Callable[[Path, Path, Path], list[str]]
CASES: dict[str, tuple[Case, str]] = {
    # paths that do not exist
    "data file does not exist": (
        lambda tmp, run, text: _train(tmp / "new", "/no/such/corpus.txt"), "data file not found: /no/such/corpus.txt"),
    "run folder to read does not exist": (
        lambda tmp, run, text: ["info", str(tmp / "nowhere")], "no such run directory or probe file"),
    "run folder to plot does not exist": (
        lambda tmp, run, text: ["plot", "variance", str(tmp / "nowhere"), "-o", str(tmp / "v.png")],
        "no such run directory or probe file"),
    "--resume of a folder that holds no run": (
        lambda tmp, run, text: _train(tmp / "nowhere", text, "--resume"), "no run to resume (no run.json)"),
    # the output folder
    "output folder already holds a run": (
        lambda tmp, run, text: _train(run, text), "already holds a run; pass --overwrite to replace it or --resume"),
    "output folder holds run files but no run.json": (
        lambda tmp, run, text: _remove(run / "run.json", _train(run, text)),
        "holds checkpoints or probes but no run.json; pass --overwrite to replace them"),
    "--out names a file": (
        lambda tmp, run, text: _train(run / "run.json", text), "is a file, not a run folder"),
    "--resume together with --overwrite": (
        lambda tmp, run, text: _train(run, text, "--resume", "--overwrite"),
        "--resume and --overwrite exclude each other"),
    # unknown names
    "unknown scheme": (
        lambda tmp, run, text: _train(tmp / "new", text, "--norm", "prenorm"),
        "unknown scheme 'prenorm'; choose one of pre, post, sandwich, deepnorm, mixln, lns, lns-gain"),
    "unknown preset": (
        lambda tmp, run, text: [*_train(tmp / "new", text), "--preset", "huge"], "unknown preset 'huge'"),
    "unknown gate granularity": (
        lambda tmp, run, text: _train(tmp / "new", text, "--gpas", "--gate", "block"), "unknown gate 'block'"),
    "unknown --dist": (
        lambda tmp, run, text: _train(tmp / "new", text, "--dist", "zero3"), "unknown --dist 'zero3'"),
    "--dist ddp without torchrun": (
        lambda tmp, run, text: _train(tmp / "new", text, "--dist", "ddp"), "--dist ddp needs a torchrun launch"),
    "unknown device": (
        lambda tmp, run, text: _train(tmp / "new", text, "--device", "tpu"), "unknown device 'tpu'"),
    "unknown probe statistic": (
        lambda tmp, run, text: _train(tmp / "new", text, "--probe-stats", "activations,entropy"),
        "unknown statistic families ['entropy']"),
    "unknown probe schedule": (
        lambda tmp, run, text: _train(tmp / "new", text, "--probe-schedule", "sometimes"),
        "unknown probe schedule 'sometimes'"),
    # numbers out of range
    "zero steps": (lambda tmp, run, text: _train(tmp / "new", text, "--steps", "0"), "steps must be positive, got 0"),
    "negative probe interval": (
        lambda tmp, run, text: _train(tmp / "new", text, "--probe-every", "-3"), "probe every must be positive"),
    "Mix-LN post layers beyond the depth": (
        lambda tmp, run, text: _train(tmp / "new", text, "--norm", "mixln", "--post-layers", "9"),
        "post_layers must be in [0, 4], got 9"),
    "sequence longer than the model's context": (
        lambda tmp, run, text: _train(tmp / "new", text, "--seq-len", "4096"),
        "--seq-len 4096 is longer than the model's maximum of 128"),
    # data
    "empty text file": (
        lambda tmp, run, text: _train(tmp / "new", _empty(tmp / "empty.txt")),
        "the train split has 0 tokens, fewer than one sequence of 16 + 1"),
    "empty token file": (
        lambda tmp, run, text: _train(tmp / "new", _empty(tmp / "empty.bin")), "the token file is empty"),
    "data shorter than one sequence": (
        lambda tmp, run, text: _train(tmp / "new", _write_npy(tmp / "short.npy", range(12))),
        "short.npy: the train split has 11 tokens, fewer than one sequence of 16 + 1"),
    "token ids beyond the vocabulary": (
        lambda tmp, run, text: _train(tmp / "new", _write_npy(tmp / "big.npy", np.arange(2000) % 300)),
        "big.npy: token id 299 is beyond the model's vocabulary of 256"),
    "negative token ids": (
        lambda tmp, run, text: _train(tmp / "new", _write_npy(tmp / "neg.npy", np.arange(2000) % 200 - 1)),
        "neg.npy: negative token id -1"),
    "token array that is not 1-D integers": (
        lambda tmp, run, text: _train(tmp / "new", _write_npy(tmp / "f.npy", np.ones((40, 50)), np.float32)),
        "expected a 1-D integer array, got 2-D float32"),
    "token file that is not a .npy array": (
        lambda tmp, run, text: _train(tmp / "new", _bytes(tmp / "junk.npy", b"not numpy at all" * 100)),
        "not a readable .npy token array"),
    ".bin token file of odd size": (
        lambda tmp, run, text: _train(tmp / "new", _bytes(tmp / "odd.bin", b"\x01" * 2001)),
        "size is not a multiple of 2 bytes (uint16)"),
    # damaged runs being read or resumed
    "corrupted parquet chunk, read with info": (
        lambda tmp, run, text: _damage(_chunk(run), ["info", str(run)]), "corrupted or unreadable probe chunk"),
    "corrupted parquet chunk, read with plot": (
        lambda tmp, run, text: _damage(_chunk(run), ["plot", "variance", str(run), "-o", str(tmp / "v.png")]),
        "corrupted or unreadable probe chunk"),
    "corrupted parquet chunk, resumed": (
        lambda tmp, run, text: _damage(_chunk(run), [*_train(run, text), "--steps", "4", "--resume"]),
        "corrupted or unreadable probe chunk"),
    "corrupted run.json, resumed": (
        lambda tmp, run, text: _damage(run / "run.json", [*_train(run, text), "--steps", "4", "--resume"]),
        "run.json: not valid JSON"),
    "corrupted checkpoint weights, resumed": (
        lambda tmp, run, text: _damage(run / "checkpoints" / "step_000002" / "model.safetensors",
                                       [*_train(run, text), "--steps", "4", "--resume"]), "unreadable weights"),
    "corrupted trainer state, resumed": (
        lambda tmp, run, text: _damage(run / "checkpoints" / "step_000002" / "trainer_state.pt",
                                       [*_train(run, text), "--steps", "4", "--resume"]), "unreadable trainer state"),
    "checkpoint without trainer state, resumed": (
        lambda tmp, run, text: _remove(run / "checkpoints" / "step_000002" / "trainer_state.pt",
                                       [*_train(run, text), "--steps", "4", "--resume"]),
        "missing trainer_state.pt; this checkpoint cannot be resumed"),
    # a resume whose configuration contradicts the run's
    "resume with another scheme": (
        lambda tmp, run, text: _train(run, text, "--norm", "post", "--resume"),
        "--resume with a model that differs from the run's: norm (run: 'pre', now: 'post')"),
    "resume with another learning rate and batch": (
        lambda tmp, run, text: _train(run, text, "--lr", "0.1", "--batch-size", "2", "--resume"),
        "--resume with training settings that differ from the run's: batch_size (run: 4, now: 2), lr (run: 0.003, "
        "now: 0.1)"),
    "resume with other data": (
        lambda tmp, run, text: _train(run, _bytes(tmp / "other.txt", b"other text " * 300), "--resume"),
        "--resume with training settings that differ from the run's: data (run: "),
    "resume of a run stopped before its first checkpoint": (
        lambda tmp, run, text: _remove_tree(run / "checkpoints", [*_train(run, text), "--steps", "4", "--resume"]),
        "nothing to resume from: the run stopped before its first checkpoint; pass --overwrite to start it again"),
    "run.json holding a JSON list, resumed": (
        lambda tmp, run, text: _write(run / "run.json", "[1, 2]", [*_train(run, text), "--resume"]),
        "run.json: not a run's metadata (a JSON object expected, found list)"),
    "config.json holding a JSON list": (
        lambda tmp, run, text: _write(run / "checkpoints" / "step_000002" / "config.json", "[1, 2]",
                                      ["profile", str(run), "--out", str(tmp / "p"), "--seq-len", "16"]),
        "config.json: not a model configuration (a JSON object expected, found list)"),
    # options that would do nothing
    "GPAS gate options without --gpas": (
        lambda tmp, run, text: _train(tmp / "new", text, "--gate", "sublayer", "--gate-grad-clip", "0.1"),
        "--gate, --gate-grad-clip: GPAS gate options do nothing without --gpas (or --naive); add it, or leave "
        "them out"),
    "--fixed-gate without --gpas": (
        lambda tmp, run, text: _train(tmp / "new", text, "--fixed-gate", "0.5"),
        "--fixed-gate: GPAS gate options do nothing without --gpas"),
    "--post-layers outside Mix-LN": (
        lambda tmp, run, text: _train(tmp / "new", text, "--post-layers", "2"),
        "--post-layers is a Mix-LN option: add --norm mixln, or leave it out (the scheme is pre)"),
    "resume on another number of processes": (
        lambda tmp, run, text: _edit_json(run / "run.json", world_size=2, then=_train(run, text, "--resume")),
        "--resume on 1 process(es), but the run was trained on 2"),
}


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _damage(path: Path, args: list[str]) -> list[str]:
    _truncate(path)
    return args


def _remove(path: Path, args: list[str]) -> list[str]:
    path.unlink()
    return args


def _remove_tree(path: Path, args: list[str]) -> list[str]:
    shutil.rmtree(path)
    return args


def _write(path: Path, content: str, args: list[str]) -> list[str]:
    path.write_text(content)
    return args


def _edit_json(path: Path, then: list[str], **changes: object) -> list[str]:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return then


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_and_leaves_the_run_as_it_was(tmp_path: Path, finished: Path, text: Path,
                                                                  case: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    make_args, message = CASES[case]
    args = make_args(tmp_path, run, text)
    before = _snapshot(run)
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert message in lines[0], lines[0]
    assert _snapshot(run) == before
    assert not (tmp_path / "new").exists()  # a refused new run leaves no folder behind


def test_plain_run_under_torchrun_is_refused(tmp_path: Path, text: Path) -> None:
    # what torchrun --nproc_per_node 2 gives each process it starts
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    res = runner.invoke(app, _train(tmp_path / "new", text), env=env)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip() == ("error: this is one of 2 torchrun processes: pass --dist ddp or --dist fsdp "
                                  "(with --dist none each would train alone into the same folder)")
    assert not (tmp_path / "new").exists()


def test_a_value_of_the_wrong_type_gets_typers_usage_message(tmp_path: Path, text: Path) -> None:
    res = runner.invoke(app, _train(tmp_path / "new", text, "--steps", "many"))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "Invalid value for '--steps'" in res.output and "Usage: gpas-probe train" in res.output
    assert not (tmp_path / "new").exists()


def test_the_table_lists_every_case() -> None:
    table = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    for case in CASES:
        assert any(f"| {case} |" in row for row in rows), case


def test_error_text_in_brackets_is_shown_verbatim(tmp_path):
    # rich markup must not eat "[hf]" from an install hint
    import typer
    from typer.testing import CliRunner

    from gpas_probe.cli.common import fail

    app = typer.Typer()

    @app.command()
    def boom() -> None:
        fail('install it with pip install "gpas-probe[hf]"')

    res = CliRunner().invoke(app, [])
    assert res.exit_code == 2 and 'gpas-probe[hf]' in res.output

"""``--log-to tensorboard`` and ``attach(..., log_to="tensorboard")``: event files that TensorBoard's own
reader reads back hold, at each recorded step and only there, the summary of that step's parquet rows
(float32, as TensorBoard stores scalars), a custom-scalars layout, and the optional variance image."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import write_corpus
from typer.testing import CliRunner

pytest.importorskip("tensorboard")

from logger_readback import assert_same, expected_summaries, plain_loop, read_tensorboard, train_args  # noqa: E402

from gpas_probe.cli.main import app  # noqa: E402
from gpas_probe.loggers import LogConfig  # noqa: E402


def f32(value: float) -> float:
    return float(np.float32(value))


def test_attach_logs_the_summary_of_each_recorded_step(tmp_path: Path) -> None:
    frame = plain_loop(tmp_path / "run", "tensorboard")
    want = expected_summaries(frame)
    assert sorted(want) == [1, 2, 4]
    assert "gpas/model/val_loss" in want[4] and "gpas/gate_scale/layer_03" in want[1]
    assert len([n for n in want[1] if n.startswith("gpas/var/resid_post/layer_")]) == 4
    got, acc = read_tensorboard(tmp_path / "run" / "tensorboard")
    assert_same(got, want, cast=f32)
    assert acc.Tags()["images"] == []  # no image unless asked for


def test_the_layout_charts_every_layer_of_each_series(tmp_path: Path) -> None:
    plain_loop(tmp_path / "run", LogConfig(to=("tensorboard",), image_every=2), steps=7)
    got, acc = read_tensorboard(tmp_path / "run" / "tensorboard")
    from tensorboard.plugins.custom_scalar import layout_pb2

    assert list(acc.PluginTagToContent("custom_scalars")) == ["custom_scalars__config__"]
    parsed = layout_pb2.Layout()
    parsed.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in parsed.category for c in cat.chart}
    assert charts["var/resid_post (all layers)"] == [r"gpas/var/resid_post/layer_\d+$"]
    assert charts["model/loss"] == [r"gpas/model/loss$"]
    # every 2nd recorded step (steps 1, 2, 4, 6), the first included: steps 1 and 4
    images = acc.Images("gpas/var_by_layer")
    assert [i.step for i in images] == [1, 4]
    assert all(i.encoded_image_string.startswith(b"\x89PNG") and i.width > 100 for i in images)


def test_train_command_logs_to_the_run_folder(tmp_path: Path) -> None:
    data = write_corpus(tmp_path, seed=0, words=2000)
    res = CliRunner().invoke(app, train_args(tmp_path / "run", data, "--log-to", "tensorboard"))
    assert res.exit_code == 0, res.output
    from gpas_probe.store import load_run

    frame = load_run(tmp_path / "run")
    want = expected_summaries(frame)
    assert sorted(want) == [1, 2, 4] and "gpas/model/val_loss" in want[2]
    assert {"gpas/model/lr", "gpas/model/grad_norm", "gpas/ratio/attn/layer_00", "gpas/grad_norm/layer_03"} <= set(
        want[4])
    got, _ = read_tensorboard(tmp_path / "run" / "tensorboard")
    assert_same(got, want, cast=f32)


def test_a_resumed_run_hides_the_steps_it_records_again(tmp_path: Path) -> None:
    data = write_corpus(tmp_path, seed=0, words=2000)
    out = tmp_path / "run"
    args = train_args(out, data, "--log-to", "tensorboard", "--checkpoint-every", "2")
    assert CliRunner().invoke(app, args).exit_code == 0
    first, _ = read_tensorboard(out / "tensorboard")
    assert sorted(first) == [1, 2, 4]
    shutil.rmtree(sorted((out / "checkpoints").iterdir())[-1])  # as if killed before step 4's checkpoint
    res = CliRunner().invoke(app, train_args(out, data, "--log-to", "tensorboard", "--resume", "--steps", "6"))
    assert res.exit_code == 0, res.output
    from gpas_probe.store import load_run

    want = expected_summaries(load_run(out))
    assert sorted(want) == [1, 2, 4, 6]
    got, _ = read_tensorboard(out / "tensorboard")  # step 4 once: the first run's events from step 4 on are hidden
    assert_same(got, want, cast=f32)

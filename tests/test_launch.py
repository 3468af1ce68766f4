"""Command-line options to configurations (``gpas_probe.launch``), without the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpas_probe.config import GateGranularity, NormScheme, ScalingMode, get_preset, parse_choice
from gpas_probe.distributed import DistContext
from gpas_probe.launch import TrainOptions, probe_config, run_label


def test_options_build_the_presets_configs_with_what_was_given() -> None:
    model, train, probe, out = TrainOptions(preset="tiny", norm="mixln", gpas=True, gate="sublayer", post_layers=1,
                                            train={"steps": 7, "lr": None, "seed": 3}).build()
    assert (model.norm, model.gpas, model.gpas_granularity, model.post_layers) == (
        NormScheme.MIXLN, True, GateGranularity.SUBLAYER, 1)
    preset = get_preset("tiny").train
    assert (train.steps, train.seed, train.lr, train.batch_size) == (7, 3, preset["lr"], preset["batch_size"])
    assert probe is not None and probe.every == 10 and out == Path("runs/tiny-mixln-gpas")


def test_naive_and_fixed_gates() -> None:
    model = TrainOptions(preset="tiny", naive=True, fixed_gate=0.5).model_config()
    assert model.gpas and model.gpas_mode is ScalingMode.NAIVE
    assert (model.gpas_learnable, model.gpas_init) == (False, 0.5)


def test_probes_off_and_chosen() -> None:
    assert probe_config(0) is None
    assert probe_config(0, "log").schedule == "log"
    assert probe_config(5, stats=" activations , gpas ").stats == ("activations", "gpas")


@pytest.mark.parametrize("options, message", [
    (dict(norm="prenorm"), "unknown scheme 'prenorm'; choose one of pre, post"),
    (dict(gate="block"), "unknown gate 'block'; choose one of layer, sublayer"),
    (dict(preset="huge"), "unknown preset 'huge'"),
    (dict(train={"steps": 0}), "steps must be positive"),
    (dict(train={"stepz": 3}), "unknown training options ['stepz']"),
    (dict(probe_stats="activations,entropy"), "unknown statistic families ['entropy']"),
])
def test_bad_options_are_one_value_error(options: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        TrainOptions(preset=options.pop("preset", "tiny"), **options).build()
    assert message in str(err.value)


def test_under_torchrun_every_rank_raises_and_only_rank_0_reports() -> None:
    for rank, quiet in ((0, False), (1, True)):
        ctx = DistContext(mode="ddp", rank=rank, world=2)
        with pytest.raises(ValueError) as err:
            TrainOptions(norm="nope").build(ctx)
        assert getattr(err.value, "shared", False) and getattr(err.value, "quiet", False) is quiet


def test_labels_and_choices() -> None:
    model = TrainOptions(preset="tiny", gpas=True).model_config()
    assert run_label(model) == "pre+gpas"
    assert run_label(model, DistContext(mode="fsdp", world=4)) == "pre+gpas (fsdp x4)"
    assert parse_choice(NormScheme.LNS, NormScheme, "scheme") is NormScheme.LNS


@pytest.mark.parametrize("options, message", [
    (dict(gate="sublayer"), "--gate: GPAS gate options do nothing without --gpas"),
    (dict(fixed_gate=0.5), "--fixed-gate: GPAS gate options do nothing without --gpas"),
    (dict(train={"gate_clip": 0.1}), "--gate-grad-clip: GPAS gate options do nothing without --gpas"),
    (dict(gate="layer", fixed_gate=0.1), "--gate, --fixed-gate: GPAS gate options"),
    (dict(post_layers=2), "--post-layers is a Mix-LN option: add --norm mixln, or leave it out (the scheme is pre)"),
    (dict(norm="sandwich", gpas=True, post_layers=1), "--post-layers is a Mix-LN option"),
])
def test_options_that_would_do_nothing_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=None) as err:
        TrainOptions(preset="tiny", **options).build()
    assert message in str(err.value)


def test_gate_options_with_gpas_or_naive_are_used() -> None:
    model = TrainOptions(preset="tiny", naive=True, gate="sublayer", fixed_gate=0.2).model_config()
    assert model.gpas_granularity is GateGranularity.SUBLAYER and model.gpas_init == 0.2
    assert TrainOptions(preset="tiny", gpas=True, train={"gate_clip": 0.1}).build()[1].gate_clip == 0.1


def test_naive_runs_are_labelled_naive() -> None:
    model, *_, out = TrainOptions(preset="tiny", naive=True).build()
    assert run_label(model) == "pre+naive" and model.label() == "pre+naive" and out == Path("runs/tiny-pre-naive")
    assert run_label(TrainOptions(preset="tiny").model_config()) == "pre"


def test_warmup_not_shorter_than_steps_warns(caplog) -> None:
    with caplog.at_level("WARNING", logger="gpas_probe.launch"):
        TrainOptions(preset="tiny", train={"steps": 10, "warmup": 10}).build()
    assert "--warmup 10 is not shorter than --steps 10" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gpas_probe.launch"):
        TrainOptions(preset="tiny", train={"steps": 10, "warmup": 3}).build()
    assert caplog.text == ""

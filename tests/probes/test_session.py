"""The probe session: hooks exist only on recorded steps and always go away, recording changes nothing,
micro-batches pool, the drop-in API records what the training loop's protocol records, every row belongs
to one family and matches its brute-force twin, and what reaches disk."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from probe_reference import TWINS, B, T, assert_rows, batch, family_of, hook_count, model_for, probed_case, rows

import gpas_probe.training as train_mod
from gpas_probe.config import ModelConfig, TrainConfig, get_preset
from gpas_probe.probes import Probe, ProbeConfig, Steps, attach, load_run, read_meta
from gpas_probe.probes.activations import ActivationStats
from gpas_probe.probes.ratios import ShortcutBranchStats
from gpas_probe.probes.recording import Recording
from gpas_probe.training import StepInfo, train


def test_every_row_belongs_to_one_family_and_nothing_is_missing(case: str, grads_at_backward_end: bool) -> None:
    got, step, _ = probed_case(case, grads_at_backward_end)
    expected = set().union(*(twin(step) for twin in TWINS.values()))
    assert set(got) == expected and all(family_of(k) in TWINS for k in got)


def test_gradient_accumulation_pools_micro_batches() -> None:
    full, micro = model_for(torch.float64, gpas=True), model_for(torch.float64, gpas=True)
    x, y = batch(2, b=4)
    cfg = ProbeConfig(every=1, stats=("activations", "ratios", "params", "gpas"))
    with Probe(full, config=cfg) as p_full, Probe(micro, config=cfg) as p_micro:
        p_full.begin_step(1)
        full(x, y).loss.backward()
        p_full.end_step(SimpleNamespace(step=1))
        p_micro.begin_step(1)
        for half in (slice(0, 2), slice(2, 4)):
            (micro(x[half], y[half]).loss / 2).backward()
        p_micro.end_step(SimpleNamespace(step=1))
        a, b = rows(p_full.frame()), rows(p_micro.frame())
    assert_rows(b, a, 1e-9)


# -- recording changes nothing, and costs nothing when it does not record -----------------------
def _tiny_train(**kw) -> TrainConfig:
    return TrainConfig(**{**get_preset("tiny").train, "steps": 4, "device": "cpu", "eval_every": 2, **kw})


def _bound_train(monkeypatch, probe: Probe, mc: ModelConfig, tc: TrainConfig, observers=()):
    real = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda cfg: probe.bind(real(cfg)).model)
    with probe:
        return train(mc, tc, observers=[*observers, probe])


@pytest.mark.parametrize("norm", ["pre", "deepnorm"])
def test_recording_every_step_leaves_training_bit_identical(monkeypatch, norm: str) -> None:
    mc, tc = ModelConfig.from_preset("tiny", norm=norm, gpas=True), _tiny_train(gate_clip=0.01)
    plain = train(mc, tc)
    probe = Probe(config=ProbeConfig(every=1))
    probed = _bound_train(monkeypatch, probe, mc, tc)
    ref = plain.model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in probed.model.state_dict().items())
    assert [h.loss for h in plain.history] == [h.loss for h in probed.history]

    frame = probe.frame()
    assert sorted(frame.step.unique()) == [1, 2, 3, 4]
    model_rows = frame[frame.site == "model"].pivot(index="step", columns="stat", values="value")
    for h in probed.history:
        row = model_rows.loc[h.step]
        assert (row["loss"], row["lr"], row["grad_norm"], row["tokens"]) == (h.loss, h.lr, h.grad_norm, h.tokens)
        assert (h.val_loss is None and math.isnan(row["val_loss"])) or row["val_loss"] == h.val_loss
    assert hook_count(probed.model) == 0


def test_no_hook_runs_on_unrecorded_steps(monkeypatch) -> None:
    mc, tc = ModelConfig.from_preset("tiny", gpas=True), _tiny_train()
    current = {"step": None}
    calls: list[int] = []
    hooks_at_forward: dict[int, int] = {}

    def counting(fn):
        def wrapper(*args, **kwargs):
            calls.append(current["step"])
            return fn(*args, **kwargs)
        return wrapper

    for cls, name in ((ActivationStats, "_forward"), (ActivationStats, "_add"), (ShortcutBranchStats, "_seen"),
                      (Recording, "_grad_hook"), (Recording, "token_row"), (Recording, "end_pass")):
        monkeypatch.setattr(cls, name, counting(getattr(cls, name)))

    probe = Probe(config=ProbeConfig(), schedule=Steps({1, 3}))

    class Spy:  # runs after the probe's begin_step: what hooks does the forward about to run see?
        def begin_step(self, step: int) -> None:
            current["step"] = step
            hooks_at_forward[step] = hook_count(probe.model)

        def after_backward(self, step: int) -> None: ...
        def end_step(self, info) -> None: ...

    spy = Spy()
    real = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda cfg: probe.bind(real(cfg)).model)
    with probe:
        train(mc, tc, observers=[probe, spy])

    assert set(calls) == {1, 3}
    assert hooks_at_forward[2] == hooks_at_forward[4] == 0 < hooks_at_forward[1] == hooks_at_forward[3]
    frame = probe.frame()
    assert set(frame.step) == {1, 2, 3, 4}  # 2 and 4 carry a validation loss: model rows only
    assert set(frame[frame.step.isin([2, 4])].site) == {"model"}
    assert set(frame[frame.step == 2].stat) == {"loss", "val_loss", "lr", "grad_norm", "tokens"}


def test_session_removes_every_hook_when_it_ends_or_raises(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("a probe hook ran after its session ended")

    model = model_for(gpas=True)
    x, y = batch(3)
    with pytest.raises(RuntimeError, match="interrupted"), Probe(model, config=ProbeConfig(every=1)) as probe:
        probe.begin_step(1)
        raised_loss = model(x, y).loss  # the graph now carries the probe's tensor hooks
        assert probe.num_hooks > 0 and hook_count(model) > 0
        raise RuntimeError("interrupted")
    assert hook_count(model) == 0 and probe.num_hooks == 0
    with pytest.raises(RuntimeError, match="closed"):
        probe.begin_step(2)

    with Probe(model, config=ProbeConfig(every=1)) as probe:  # ends normally, while armed
        probe.begin_step(1)
        ended_loss = model(x, y).loss
    assert hook_count(model) == 0 and probe.num_hooks == 0

    for cls, name in ((ActivationStats, "_forward"), (ActivationStats, "_add"), (Recording, "_grad_hook"),
                      (Recording, "token_row")):
        monkeypatch.setattr(cls, name, boom)
    raised_loss.backward()  # would raise if a tensor or post-accumulate-grad hook were left
    ended_loss.backward()
    model(x, y).loss.backward()


# -- the drop-in API -----------------------------------------------------------------------------
def test_drop_in_api_records_what_the_observer_protocol_records() -> None:
    model_a = model_for(gpas=True, gpas_granularity="sublayer")
    model_b = copy.deepcopy(model_a)
    opt_a = torch.optim.Adam(model_a.parameters(), lr=3e-3)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=3e-3)
    probe_a = Probe(model_a, config=ProbeConfig(every=2))
    probe_b = attach(model_b, every=2, optimizer=opt_b)
    with probe_a, probe_b:
        for step in range(1, 5):
            x, y = batch(10 + step)
            probe_a.begin_step(step)
            loss = model_a(x, y).loss
            loss.backward()
            probe_a.after_backward(step)
            gn = torch.nn.utils.clip_grad_norm_(model_a.parameters(), 0.1)
            opt_a.step()
            opt_a.zero_grad()
            probe_a.end_step(StepInfo(step, loss.item(), 3e-3, float(gn), step * B * T, 1.0))

            loss = model_b(x, y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model_b.parameters(), 0.1)
            opt_b.step()
            opt_b.zero_grad()
            probe_b.step(step, loss=loss, tokens=step * B * T)
            with torch.no_grad():  # an evaluation pass between steps is not recorded
                model_b(*batch(99))
        a, b = probe_a.frame(), probe_b.frame()
    assert sorted(a[a.layer >= 0].step.unique()) == sorted(b[b.layer >= 0].step.unique()) == [1, 2, 4]
    assert sorted(a.step.unique()) == sorted(b.step.unique()) == [1, 2, 3, 4]  # model rows on every step
    model_b3 = {k: v for k, v in rows(b[b.step == 3]).items() if k[3] != "grad_norm"}  # not given to step()
    assert_rows(model_b3, {k: v for k, v in rows(a[a.step == 3]).items() if k in model_b3}, 1e-6)
    for step in (1, 2, 4):
        assert_rows(rows(b[b.step == step]), rows(a[a.step == step]), 1e-5)
    assert hook_count(model_b) == 0


def test_armed_step_survives_a_no_grad_forward_and_rejects_a_bad_mask() -> None:
    model = model_for(gpas=True)
    probe = attach(model, every=1)
    probe.set_exclude_mask(torch.zeros(B + 1, T, dtype=torch.bool))
    with probe, pytest.raises(ValueError, match="token mask"):
        model(*batch(4))
    with pytest.raises(ValueError, match="boolean"):
        probe.set_exclude_mask(torch.zeros(B, T))


# -- choices, schedules, odd values, output ------------------------------------------------------
def test_statistic_subsets() -> None:
    model = model_for(gpas=True)
    x, y = batch(5)
    cfg = ProbeConfig(every=1, stats=("activations", "gpas"), sites=("resid_post",), directions=("bwd",))
    with Probe(model, config=cfg) as probe:
        probe.begin_step(1)
        model(x, y).loss.backward()
        probe.end_step(SimpleNamespace(step=1, loss=1.0))
        frame = probe.frame()
    assert set(zip(frame.site, frame.direction, strict=True)) == {("resid_post", "bwd"), ("gpas", "none")}
    assert len(frame) == 4 * 3 + 4 * 4
    with pytest.raises(ValueError, match="statistic families"):
        ProbeConfig(stats=("activations", "nope"))
    with pytest.raises(ValueError, match="sites"):
        ProbeConfig(sites=("resid_pre", "attn_shortcut"))


def test_non_finite_values_are_recorded(tmp_path) -> None:
    model = model_for(gpas=True)
    with torch.no_grad():
        model.layers[2].mlp.down_proj.weight[0, 0] = math.inf
    with Probe(model, tmp_path / "run", config=ProbeConfig(every=1)) as probe:
        probe.begin_step(1)
        loss = model(*batch(6)).loss
        loss.backward()
        probe.end_step(SimpleNamespace(step=1, loss=loss.item(), grad_norm=math.nan))
    frame = load_run(tmp_path / "run")
    values = frame.set_index(["layer", "site", "direction", "stat"]).value
    assert values[(0, "resid_pre", "fwd", "rms")] == pytest.approx(rows(frame)[(0, "resid_pre", "fwd", "rms")])
    assert math.isfinite(values[(1, "resid_post", "fwd", "rms")])
    assert not math.isfinite(values[(2, "mlp_out", "fwd", "absmax")])
    assert math.isnan(values[(-1, "model", "none", "loss")]) and math.isnan(values[(-1, "model", "none", "grad_norm")])


def test_run_directory_gets_chunks_and_metadata(tmp_path) -> None:
    model = model_for(gpas=True)
    out = tmp_path / "my-run"
    with Probe(model, out, config=ProbeConfig(every=1, flush_steps=2), meta={"train_config": {"lr": 1.0}}) as probe:
        for step in (1, 2, 3):
            probe.begin_step(step)
            model(*batch(step)).loss.backward()
            probe.end_step(SimpleNamespace(step=step, loss=1.0))
    parts = sorted(p.name for p in (out / "probes").iterdir())
    assert parts == ["_meta.json", "part-000000.parquet", "part-000001.parquet"]
    meta = read_meta(out)
    assert meta["run_id"] == "my-run" and meta["train_config"] == {"lr": 1.0}
    assert meta["model_config"]["gpas"] is True and meta["probe_config"]["every"] == 1
    frame = pd.read_parquet(out / "probes")
    assert sorted(frame.step.unique()) == [1, 2, 3] and set(frame.run_id) == {"my-run"}

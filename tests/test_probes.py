"""The probes against brute-force references (retain_grad and plain tensor math on the same batch)."""

from __future__ import annotations

import copy
import importlib
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from gpas_probe.config import ModelConfig, TrainConfig, get_preset
from gpas_probe.gpas import clip_gate_grad_, gpas_modules
from gpas_probe.model import SITES, build_model
from gpas_probe.probes import (
    ACTIVATION_SITES,
    Driver,
    Every,
    LogSpaced,
    Probe,
    ProbeConfig,
    Steps,
    attach,
    load_run,
    make_schedule,
    read_meta,
)
from gpas_probe.probes.activations import ActivationStats, moments
from gpas_probe.probes.gates import gate_sites
from gpas_probe.probes.ratios import ShortcutBranchStats
from gpas_probe.probes.recording import Recording
from gpas_probe.training import StepInfo, train

# the package re-exports the function train(), which hides the module of the same name
train_mod = importlib.import_module("gpas_probe.training")

B, T = 3, 12


# -- helpers -------------------------------------------------------------------------------------
def _model(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_preset("tiny", **overrides)).to(dtype)
    with torch.no_grad():  # distinct, nonzero gates (a fresh model has alpha = 0 everywhere)
        for i, gate in enumerate(gpas_modules(model)):
            gate.alpha.fill_(0.35 * i - 0.6)
    return model


def _batch(seed: int, b: int = B, t: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t), generator=g), torch.randint(0, 256, (b, t), generator=g)


def _hook_count(model: torch.nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(m._backward_pre_hooks)
    for p in model.parameters():
        n += len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {})
    return n


def _capture(model: torch.nn.Module) -> tuple[dict, list]:
    """Every hook-point output of a forward, with retain_grad: the reference activations and gradients."""
    acts: dict = {}
    handles = []
    for block in model.layers:
        for site in SITES:
            def hook(_m, _a, out, key=(block.layer, site)):
                if out.requires_grad:
                    out.retain_grad()
                acts[key] = out
            handles.append(getattr(block, f"hook_{site}").register_forward_hook(hook))
    return acts, handles


def _rows(frame: pd.DataFrame) -> dict:
    return {(int(r.layer), r.site, r.direction, r.stat): float(r.value) for r in frame.itertuples()}


def _stats(t: torch.Tensor) -> dict[str, float]:
    """var/rms/absmax of the kept tokens ``t`` (N, hidden), in float64."""
    t = t.double()
    return {"var": t.var(dim=-1, unbiased=False).mean().item(), "rms": t.pow(2).mean().sqrt().item(),
            "absmax": t.abs().max().item()}


def _norm(ts) -> float:
    return math.sqrt(sum(t.double().pow(2).sum().item() for t in ts))


def _reference_step(model, probe, step, x, y, exclude=None, skip_first=False, val_loss=None):
    """One training step driven through the observer protocol, with everything needed to recompute
    every statistic by hand; returns (expected rows, the StepInfo)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    keep = torch.ones(B, T, dtype=torch.bool) if exclude is None else ~exclude
    if skip_first:
        keep[:, 0] = False

    probe.begin_step(step)
    acts, handles = _capture(model)
    loss = model(x, y).loss
    loss.backward()
    for h in handles:
        h.remove()
    probe.after_backward(step)
    grads = {p: p.grad.detach().clone() for p in params}
    before = {p: p.detach().clone() for p in params}
    gates = {(b.layer, site): (g.alpha.detach().clone(), g.scale.clone(), g.alpha.grad.clone())
             for b in model.layers for site, g in gate_sites(b)}
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1e-3)  # clipping edits .grad in place
    clip_gate_grad_(model, 1e-4)
    opt.step()
    opt.zero_grad(set_to_none=True)
    info = StepInfo(step, loss.item(), 1e-2, float(grad_norm), 123 * step, 1.0, val_loss)
    probe.end_step(info)

    exp = {}
    for block in model.layers:
        layer = block.layer
        for site in ACTIVATION_SITES:
            a = acts[(layer, site)]
            for direction, t in (("fwd", a.detach()), ("bwd", a.grad)):
                for stat, v in _stats(t[keep]).items():
                    exp[(layer, site, direction, stat)] = v
        for sub in ("attn", "mlp"):
            s = acts[(layer, f"{sub}_shortcut")].detach()[keep].double()
            b = acts[(layer, f"{sub}_out")].detach()[keep].double()
            exp[(layer, sub, "fwd", "shortcut_branch_ratio")] = (s.pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
            exp[(layer, sub, "fwd", "shortcut_branch_cos")] = F.cosine_similarity(s, b, dim=-1).mean().item()
        ps = [p for p in block.parameters() if p.requires_grad]
        exp[(layer, "params", "none", "grad_norm")] = _norm(grads[p] for p in ps)
        exp[(layer, "params", "none", "weight_norm")] = _norm(before[p] for p in ps)
        exp[(layer, "params", "none", "update_ratio")] = (_norm(p.detach() - before[p] for p in ps)
                                                      / _norm(before[p] for p in ps))
    for (layer, site), (alpha, scale, grad) in gates.items():
        exp[(layer, site, "none", "alpha")] = alpha.item()
        exp[(layer, site, "none", "silu_alpha")] = F.silu(alpha.double()).item()
        exp[(layer, site, "none", "scale")] = scale.item()
        exp[(layer, site, "none", "alpha_grad")] = grad.item()
    for stat in ("loss", "lr", "grad_norm", "tokens", "val_loss"):
        if getattr(info, stat) is not None:
            exp[(-1, "model", "none", stat)] = float(getattr(info, stat))
    return exp, info


def _assert_rows(got: dict, exp: dict, rtol: float) -> None:
    assert set(got) == set(exp), (sorted(set(exp) - set(got))[:5], sorted(set(got) - set(exp))[:5])
    bad = [(k, got[k], exp[k]) for k in exp if not math.isclose(got[k], exp[k], rel_tol=rtol, abs_tol=1e-30)]
    assert not bad, bad[:5]


# -- statistics vs brute force -------------------------------------------------------------------
CASES = {
    "pre-gpas-f64-padding": (torch.float64, dict(gpas=True), "pad", False, 1e-10),
    "deepnorm-sublayer-gates-f64-skip-first": (torch.float64, dict(norm="deepnorm", gpas=True,
                                                                    gpas_granularity="sublayer"), None, True, 1e-10),
    "mixln-naive-f32": (torch.float32, dict(norm="mixln", post_layers=2, gpas=True, gpas_mode="naive"), None, False,
                        1e-5),
    "sandwich-f32-padding": (torch.float32, dict(norm="sandwich", gpas=True), "pad", False, 1e-5),
    "lns-no-gpas-f32": (torch.float32, dict(norm="lns"), None, False, 1e-5),
}


@pytest.mark.parametrize("grads_at_backward_end", [False, True], ids=["grad-hooks", "grads-at-backward-end"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_statistic_matches_brute_force(case: str, grads_at_backward_end: bool) -> None:
    dtype, overrides, pad, skip_first, rtol = CASES[case]
    model = _model(dtype, **overrides)
    x, y = _batch(1)
    exclude = None
    if pad:  # right padding of different lengths, labelled -100 as padding is
        lengths = torch.tensor([T, T - 3, T - 7])
        exclude = torch.arange(T)[None, :] >= lengths[:, None]
        y = y.masked_fill(exclude, -100)
    driver = Driver(grads_at_backward_end=grads_at_backward_end, grad_norm_given=grads_at_backward_end)  # as train()
    probe = Probe(model, config=ProbeConfig(every=1, skip_first_position=skip_first), driver=driver)
    probe.set_exclude_mask(exclude)
    with probe:
        exp, _ = _reference_step(model, probe, 1, x, y, exclude, skip_first, val_loss=2.5)
        got = _rows(probe.frame())
    _assert_rows(got, exp, rtol)
    n_gates = len(gpas_modules(model))
    assert sum(k[1].startswith("gpas") for k in got) == 4 * n_gates
    assert _hook_count(model) == 0


def test_gradient_accumulation_pools_micro_batches() -> None:
    full, micro = _model(torch.float64, gpas=True), _model(torch.float64, gpas=True)
    x, y = _batch(2, b=4)
    cfg = ProbeConfig(every=1, stats=("activations", "ratios", "params", "gpas"))
    with Probe(full, config=cfg) as p_full, Probe(micro, config=cfg) as p_micro:
        p_full.begin_step(1)
        full(x, y).loss.backward()
        p_full.end_step(SimpleNamespace(step=1))
        p_micro.begin_step(1)
        for half in (slice(0, 2), slice(2, 4)):
            (micro(x[half], y[half]).loss / 2).backward()
        p_micro.end_step(SimpleNamespace(step=1))
        a, b = _rows(p_full.frame()), _rows(p_micro.frame())
    _assert_rows(b, a, 1e-9)


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
    assert _hook_count(probed.model) == 0


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

    for cls, name in ((ActivationStats, "_forward"), (ActivationStats, "_backward"), (ShortcutBranchStats, "_seen"),
                      (Recording, "_grad_hook")):
        monkeypatch.setattr(cls, name, counting(getattr(cls, name)))

    probe = Probe(config=ProbeConfig(), schedule=Steps({1, 3}))

    class Spy:  # runs after the probe's begin_step: what hooks does the forward about to run see?
        def begin_step(self, step: int) -> None:
            current["step"] = step
            hooks_at_forward[step] = _hook_count(probe.model)

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

    model = _model(gpas=True)
    x, y = _batch(3)
    with pytest.raises(RuntimeError, match="interrupted"), Probe(model, config=ProbeConfig(every=1)) as probe:
        probe.begin_step(1)
        raised_loss = model(x, y).loss  # the graph now carries the probe's tensor hooks
        assert probe.num_hooks > 0 and _hook_count(model) > 0
        raise RuntimeError("interrupted")
    assert _hook_count(model) == 0 and probe.num_hooks == 0
    with pytest.raises(RuntimeError, match="closed"):
        probe.begin_step(2)

    with Probe(model, config=ProbeConfig(every=1)) as probe:  # ends normally, while armed
        probe.begin_step(1)
        ended_loss = model(x, y).loss
    assert _hook_count(model) == 0 and probe.num_hooks == 0

    for cls, name in ((ActivationStats, "_forward"), (ActivationStats, "_backward"), (Recording, "_grad_hook")):
        monkeypatch.setattr(cls, name, boom)
    raised_loss.backward()  # would raise if a tensor or post-accumulate-grad hook were left
    ended_loss.backward()
    model(x, y).loss.backward()


# -- the drop-in API -----------------------------------------------------------------------------
def test_drop_in_api_records_what_the_observer_protocol_records() -> None:
    model_a = _model(gpas=True, gpas_granularity="sublayer")
    model_b = copy.deepcopy(model_a)
    opt_a = torch.optim.Adam(model_a.parameters(), lr=3e-3)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=3e-3)
    probe_a = Probe(model_a, config=ProbeConfig(every=2))
    probe_b = attach(model_b, every=2, optimizer=opt_b)
    with probe_a, probe_b:
        for step in range(1, 5):
            x, y = _batch(10 + step)
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
                model_b(*_batch(99))
        a, b = probe_a.frame(), probe_b.frame()
    assert sorted(a[a.layer >= 0].step.unique()) == sorted(b[b.layer >= 0].step.unique()) == [1, 2, 4]
    assert sorted(a.step.unique()) == sorted(b.step.unique()) == [1, 2, 3, 4]  # model rows on every step
    model_b3 = {k: v for k, v in _rows(b[b.step == 3]).items() if k[3] != "grad_norm"}  # not given to step()
    _assert_rows(model_b3, {k: v for k, v in _rows(a[a.step == 3]).items() if k in model_b3}, 1e-6)
    for step in (1, 2, 4):
        _assert_rows(_rows(b[b.step == step]), _rows(a[a.step == step]), 1e-5)
    assert _hook_count(model_b) == 0


def test_armed_step_survives_a_no_grad_forward_and_rejects_a_bad_mask() -> None:
    model = _model(gpas=True)
    probe = attach(model, every=1)
    probe.set_exclude_mask(torch.zeros(B + 1, T, dtype=torch.bool))
    with probe, pytest.raises(ValueError, match="token mask"):
        model(*_batch(4))
    with pytest.raises(ValueError, match="boolean"):
        probe.set_exclude_mask(torch.zeros(B, T))


# -- choices, schedules, odd values, output ------------------------------------------------------
def test_statistic_subsets() -> None:
    model = _model(gpas=True)
    x, y = _batch(5)
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
    model = _model(gpas=True)
    with torch.no_grad():
        model.layers[2].mlp.down_proj.weight[0, 0] = math.inf
    with Probe(model, tmp_path / "run", config=ProbeConfig(every=1)) as probe:
        probe.begin_step(1)
        loss = model(*_batch(6)).loss
        loss.backward()
        probe.end_step(SimpleNamespace(step=1, loss=loss.item(), grad_norm=math.nan))
    frame = load_run(tmp_path / "run")
    values = frame.set_index(["layer", "site", "direction", "stat"]).value
    assert values[(0, "resid_pre", "fwd", "rms")] == pytest.approx(_rows(frame)[(0, "resid_pre", "fwd", "rms")])
    assert math.isfinite(values[(1, "resid_post", "fwd", "rms")])
    assert not math.isfinite(values[(2, "mlp_out", "fwd", "absmax")])
    assert math.isnan(values[(-1, "model", "none", "loss")]) and math.isnan(values[(-1, "model", "none", "grad_norm")])


def test_a_step_with_every_token_excluded_records_nan_and_is_not_called_non_finite() -> None:
    model = _model()
    with Probe(model, config=ProbeConfig(every=1, stats=("activations",))) as probe:
        probe.set_exclude_mask(torch.ones(B, T, dtype=torch.bool))
        probe.begin_step(1)
        model(*_batch(7)).loss.backward()
        probe.end_step(SimpleNamespace(step=1))
        frame = probe.frame()
        assert probe.first_non_finite() is None
    assert len(frame) and frame["value"].isna().all()  # var, rms and absmax of no token: undefined


@pytest.mark.parametrize("grads_at_backward_end", [False, True])
def test_parameter_statistics_of_a_bf16_model_match_float64(grads_at_backward_end: bool) -> None:
    model = _model(torch.bfloat16, gpas=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    with Probe(model, config=ProbeConfig(every=1, stats=("params",)),
               driver=Driver(grads_at_backward_end=grads_at_backward_end)) as probe:
        probe.begin_step(1)
        model(*_batch(3)).loss.backward()
        probe.after_backward(1)
        grads = {p: p.grad.double() for p in params}
        before = {p: p.detach().double() for p in params}
        opt.step()  # bf16 weights: the update is rounded to bf16, and read back exactly
        probe.end_step(SimpleNamespace(step=1))
        got = _rows(probe.frame())
    for block in model.layers:
        ps = [p for p in block.parameters() if p.requires_grad]
        w = _norm(before[p] for p in ps)
        exp = {"grad_norm": _norm(grads[p] for p in ps), "weight_norm": w,
               "update_ratio": _norm(p.detach().double() - before[p] for p in ps) / w}
        for stat, value in exp.items():
            assert got[(block.layer, "params", "none", stat)] == pytest.approx(value, rel=1e-5), stat


def test_large_finite_activations_give_finite_moments() -> None:

    x = torch.randn(2, 64, 4096, generator=torch.Generator().manual_seed(0)) + 1e15  # a diverging run's scale
    keep = torch.ones(2, 64, dtype=torch.bool)
    for m in (moments(x, None), moments(x, keep)):
        assert all(math.isfinite(float(v)) for v in m)
        rms = math.sqrt((float(m.dev_sq) + 4096 * float(m.mean_sq)) / (float(m.n) * 4096))
        assert rms == pytest.approx(1e15, rel=1e-3)


def test_schedules_match_their_definitions() -> None:
    assert [s for s in range(1, 20) if Every(5)(s)] == [1, 5, 10, 15]
    assert [s for s in range(1, 20) if Every(5, first=False)(s)] == [5, 10, 15]
    for per_decade in (1, 3, 10, 24):
        expected = {round(10 ** (k / per_decade)) for k in range(6 * per_decade)}
        got = {s for s in range(1, 30_001) if LogSpaced(per_decade)(s)}
        assert got == {s for s in expected if s <= 30_000}
    assert [s for s in range(1, 40) if LogSpaced(10)(s)] == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32]
    combined = Steps({7}) | Every(10, first=False)
    assert [s for s in range(1, 31) if combined(s)] == [7, 10, 20, 30]
    log_every = make_schedule(ProbeConfig(schedule="log", every=50))
    assert log_every(50) and log_every(13) and not log_every(49)
    with pytest.raises(ValueError, match="schedule"):
        ProbeConfig(schedule="sometimes")


def test_run_directory_gets_chunks_and_metadata(tmp_path) -> None:
    model = _model(gpas=True)
    out = tmp_path / "my-run"
    with Probe(model, out, config=ProbeConfig(every=1, flush_steps=2), meta={"train_config": {"lr": 1.0}}) as probe:
        for step in (1, 2, 3):
            probe.begin_step(step)
            model(*_batch(step)).loss.backward()
            probe.end_step(SimpleNamespace(step=step, loss=1.0))
    parts = sorted(p.name for p in (out / "probes").iterdir())
    assert parts == ["_meta.json", "part-000000.parquet", "part-000001.parquet"]
    meta = read_meta(out)
    assert meta["run_id"] == "my-run" and meta["train_config"] == {"lr": 1.0}
    assert meta["model_config"]["gpas"] is True and meta["probe_config"]["every"] == 1
    frame = pd.read_parquet(out / "probes")
    assert sorted(frame.step.unique()) == [1, 2, 3] and set(frame.run_id) == {"my-run"}

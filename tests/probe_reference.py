"""The brute-force twin of every probe statistic.

One training step is driven through the probe's observer protocol while every hook point's tensor is
kept (``retain_grad``); each statistic is then recomputed from those tensors with plain torch math in
float64, family by family (``tests/probes/test_<family>.py`` compare the probes' rows with these).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from helpers import ratio_bounds

from gpas_probe.config import ModelConfig
from gpas_probe.gpas import clip_gate_grad_, gpas_modules
from gpas_probe.model import SITES, build_model
from gpas_probe.probes import ACTIVATION_SITES, Driver, Probe, ProbeConfig
from gpas_probe.probes.gates import gate_sites
from gpas_probe.training import StepInfo

B, T = 3, 12
Rows = dict[tuple[int, str, str, str], float]

#: Model, padding and precision cases: (dtype, config overrides, padding, skip position 0, rtol, probe options).
#: A low outlier factor flags some tokens of these random models as outliers, so the robust statistics
#: differ from the raw ones.
CASES = {
    "pre-gpas-f64-padding": (torch.float64, dict(gpas=True), "pad", False, 1e-10,
                             dict(outlier_factor=1.3, intervals=True)),
    "deepnorm-sublayer-gates-f64-skip-first": (torch.float64, dict(norm="deepnorm", gpas=True,
                                                                    gpas_granularity="sublayer"), None, True, 1e-10,
                                               dict(outlier_factor=1.2)),
    "mixln-naive-f32": (torch.float32, dict(norm="mixln", post_layers=2, gpas=True, gpas_mode="naive"), None, False,
                        1e-5, {}),
    "sandwich-f32-padding": (torch.float32, dict(norm="sandwich", gpas=True), "pad", False, 1e-5,
                             dict(outlier_factor=1.25, intervals=True)),
    "lns-no-gpas-f32": (torch.float32, dict(norm="lns"), None, False, 1e-5, {}),
}


def model_for(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A ``tiny`` model with distinct, nonzero gates (a fresh model has alpha = 0 everywhere)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_preset("tiny", **overrides)).to(dtype)
    with torch.no_grad():
        for i, gate in enumerate(gpas_modules(model)):
            gate.alpha.fill_(0.35 * i - 0.6)
    return model


def batch(seed: int, b: int = B, t: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t), generator=g), torch.randint(0, 256, (b, t), generator=g)


def hook_count(model: torch.nn.Module) -> int:
    """Every hook on the model's modules and parameters."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(m._backward_pre_hooks)
    for p in model.parameters():
        n += len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {})
    return n


def rows(frame: pd.DataFrame) -> Rows:
    return {(int(r.layer), r.site, r.direction, r.stat): float(r.value) for r in frame.itertuples()}


def assert_rows(got: Rows, exp: Rows, rtol: float) -> None:
    assert set(got) == set(exp), (sorted(set(exp) - set(got))[:5], sorted(set(got) - set(exp))[:5])
    bad = [(k, got[k], exp[k]) for k in exp if not math.isclose(got[k], exp[k], rel_tol=rtol, abs_tol=1e-30)]
    assert not bad, bad[:5]


def norm(ts: Any) -> float:
    return math.sqrt(sum(t.double().pow(2).sum().item() for t in ts))


@dataclass
class Step:
    """What one step leaves for the references: every hook point's tensor (with its gradient), the positions
    kept, the parameters' gradients and values before the update, the gates and the step's info."""

    model: torch.nn.Module
    acts: dict[tuple[int, str], torch.Tensor]
    keep: torch.Tensor
    grads: dict[torch.nn.Parameter, torch.Tensor]
    before: dict[torch.nn.Parameter, torch.Tensor]
    gates: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    info: StepInfo
    tokens: torch.Tensor
    options: dict[str, Any]


def _capture(model: torch.nn.Module) -> tuple[dict, list]:
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


def run_step(model: torch.nn.Module, probe: Probe, step: int, x: torch.Tensor, y: torch.Tensor,
             exclude: torch.Tensor | None = None, skip_first: bool = False, val_loss: float | None = None,
             options: dict[str, Any] | None = None) -> Step:
    """One training step (Adam, global and gate clipping) through the observer protocol, as train() drives it."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    keep = torch.ones(*x.shape, dtype=torch.bool) if exclude is None else ~exclude
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
    return Step(model, acts, keep, grads, before, gates, info, x, {"outlier_factor": 10.0, **(options or {})})


# -- the twins, one per statistic family ------------------------------------------------------------
def activation_rows(s: Step) -> Rows:
    """var (mean over tokens of the population variance over hidden), rms and absmax of every activation
    site and of the loss's gradient with respect to it, over the kept tokens."""
    exp = {}
    for block in s.model.layers:
        for site in ACTIVATION_SITES:
            a = s.acts[(block.layer, site)]
            for direction, t in (("fwd", a.detach()), ("bwd", a.grad)):
                t = t[s.keep].double()
                exp[(block.layer, site, direction, "var")] = t.var(dim=-1, unbiased=False).mean().item()
                exp[(block.layer, site, direction, "rms")] = t.pow(2).mean().sqrt().item()
                exp[(block.layer, site, direction, "absmax")] = t.abs().max().item()
    return exp


def _outliers(mean_square: torch.Tensor, keep: torch.Tensor, factor: float) -> torch.Tensor:
    """Kept tokens whose mean square is above factor² x the median kept token's (the lower middle value
    for an even count, as torch's median)."""
    kept = sorted(mean_square[keep].tolist())
    median = kept[(len(kept) - 1) // 2]
    return keep & (mean_square > factor * factor * median)


def ratio_rows(s: Step) -> Rows:
    """rms(shortcut) / rms(branch) over all kept elements, their per-token cosine, averaged, and the ratio
    without the tokens whose shortcut is an outlier (with its interval when asked for)."""
    exp = {}
    factor = s.options["outlier_factor"]
    for block in s.model.layers:
        for sub in ("attn", "mlp"):
            sc_all = s.acts[(block.layer, f"{sub}_shortcut")].detach().double()
            br_all = s.acts[(block.layer, f"{sub}_out")].detach().double()
            sc, br = sc_all[s.keep], br_all[s.keep]
            key = (block.layer, sub, "fwd")
            exp[key + ("shortcut_branch_ratio",)] = (sc.pow(2).mean().sqrt() / br.pow(2).mean().sqrt()).item()
            exp[key + ("shortcut_branch_cos",)] = F.cosine_similarity(sc, br, dim=-1).mean().item()
            rob = s.keep & ~_outliers(sc_all.pow(2).mean(-1), s.keep, factor)
            exp[key + ("shortcut_branch_ratio_robust",)] = math.sqrt(sc_all[rob].pow(2).sum().item()
                                                                     / br_all[rob].pow(2).sum().item())
            if s.options.get("intervals"):
                per_seq = [(sc_all[j][rob[j]].pow(2).sum().item(), br_all[j][rob[j]].pow(2).sum().item())
                           for j in range(len(rob))]
                lo, hi = ratio_bounds([a for a, _ in per_seq], [b for _, b in per_seq])
                exp[key + ("shortcut_branch_ratio_robust_lo",)] = math.sqrt(max(lo, 0.0))
                exp[key + ("shortcut_branch_ratio_robust_hi",)] = math.sqrt(hi)
    return exp


def outlier_rows(s: Step) -> Rows:
    """Per activation site (fwd): the outlier tokens (token RMS above outlier_factor x the median kept
    token's), the statistics without them, and where the largest |x| sits."""
    exp = {}
    factor = s.options["outlier_factor"]
    for block in s.model.layers:
        for site in ACTIVATION_SITES:
            a = s.acts[(block.layer, site)].detach().double()
            key = (block.layer, site, "fwd")
            out = _outliers(a.pow(2).mean(-1), s.keep, factor)
            rob = s.keep & ~out
            dev = (a - a.mean(-1, keepdim=True)).pow(2).sum(-1)  # (B, T)
            r = a[rob]
            exp[key + ("var_robust",)] = r.var(dim=-1, unbiased=False).mean().item()
            exp[key + ("rms_robust",)] = r.pow(2).mean().sqrt().item()
            exp[key + ("absmax_robust",)] = r.abs().max().item()
            exp[key + ("outlier_frac",)] = out.sum().item() / s.keep.sum().item()
            exp[key + ("outlier_var_share",)] = dev[out].sum().item() / dev[s.keep].sum().item()
            exp[key + ("outlier_pos0_frac",)] = out[:, 0].sum().item() / len(out)
            biggest = a.abs().masked_fill(~s.keep[..., None], -1.0)
            b, t, h = (int(i) for i in torch.nonzero(biggest == biggest.max())[0])
            exp[key + ("absmax_dim",)], exp[key + ("absmax_pos",)] = float(h), float(t)
            exp[key + ("absmax_token",)] = float(s.tokens[b, t])
            if s.options.get("intervals"):
                lo, hi = ratio_bounds([dev[j][rob[j]].sum().item() for j in range(len(rob))],
                                   [rob[j].sum().item() for j in range(len(rob))])
                hidden = a.shape[-1]
                exp[key + ("var_robust_lo",)], exp[key + ("var_robust_hi",)] = lo / hidden, hi / hidden
    return exp


def param_rows(s: Step) -> Rows:
    """Per layer over its trainable parameters: gradient norm before clipping, weight norm before the
    update, and the update's norm relative to it."""
    exp = {}
    for block in s.model.layers:
        ps = [p for p in block.parameters() if p.requires_grad]
        w = norm(s.before[p] for p in ps)
        exp[(block.layer, "params", "none", "grad_norm")] = norm(s.grads[p] for p in ps)
        exp[(block.layer, "params", "none", "weight_norm")] = w
        exp[(block.layer, "params", "none", "update_ratio")] = norm(p.detach() - s.before[p] for p in ps) / w
    return exp


def gate_rows(s: Step) -> Rows:
    """alpha, SiLU(alpha), the forward scale 1 - SiLU(alpha) and alpha's gradient before clipping."""
    exp = {}
    for (layer, site), (alpha, scale, grad) in s.gates.items():
        exp[(layer, site, "none", "alpha")] = alpha.item()
        exp[(layer, site, "none", "silu_alpha")] = F.silu(alpha.double()).item()
        exp[(layer, site, "none", "scale")] = scale.item()
        exp[(layer, site, "none", "alpha_grad")] = grad.item()
    return exp


def model_rows(s: Step) -> Rows:
    """The step's own values at layer -1."""
    return {(-1, "model", "none", stat): float(getattr(s.info, stat))
            for stat in ("loss", "lr", "grad_norm", "tokens", "val_loss") if getattr(s.info, stat) is not None}


TWINS = {"activations": activation_rows, "outliers": outlier_rows, "ratios": ratio_rows, "params": param_rows,
         "gpas": gate_rows, "model": model_rows}
#: The statistics of the outliers family (the rest at activation sites are the activations family's).
OUTLIER_STATS = ("var_robust", "rms_robust", "absmax_robust", "outlier_frac", "outlier_var_share",
                 "outlier_pos0_frac", "absmax_dim", "absmax_pos", "absmax_token", "var_robust_lo", "var_robust_hi")


def family_of(key: tuple[int, str, str, str]) -> str:
    """The statistic family a row belongs to."""
    layer, site = key[0], key[1]
    if layer == -1:
        return "model"
    if site in ACTIVATION_SITES:
        return "outliers" if key[3] in OUTLIER_STATS else "activations"
    return {"attn": "ratios", "mlp": "ratios", "params": "params"}.get(site, "gpas" if site.startswith("gpas") else "?")


@functools.cache
def probed_case(case: str, grads_at_backward_end: bool) -> tuple[Rows, Step, float]:
    """A recorded step of one of :data:`CASES` with every family on: (the probe's rows, the step, rtol).
    Cached: each family's test file reads the same step."""
    dtype, overrides, pad, skip_first, rtol, options = CASES[case]
    model = model_for(dtype, **overrides)
    x, y = batch(1)
    exclude = None
    if pad:  # right padding of different lengths, labelled -100 as padding is
        lengths = torch.tensor([T, T - 3, T - 7])
        exclude = torch.arange(T)[None, :] >= lengths[:, None]
        y = y.masked_fill(exclude, -100)
    driver = Driver(grads_at_backward_end=grads_at_backward_end, grad_norm_given=grads_at_backward_end)  # as train()
    probe = Probe(model, config=ProbeConfig(every=1, skip_first_position=skip_first, **options), driver=driver)
    probe.set_exclude_mask(exclude)
    probe.set_tokens(x)
    with probe:
        step = run_step(model, probe, 1, x, y, exclude, skip_first, val_loss=2.5, options=options)
        got = rows(probe.frame())
    assert hook_count(model) == 0
    return got, step, rtol


def family_case(family: str, case: str, grads_at_backward_end: bool) -> tuple[Rows, Rows, float]:
    """(the probe's rows of ``family``, its brute-force twin's, rtol) for a case."""
    got, step, rtol = probed_case(case, grads_at_backward_end)
    return {k: v for k, v in got.items() if family_of(k) == family}, TWINS[family](step), rtol

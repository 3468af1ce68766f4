"""Layer importance against delete-and-rerun and hand-computed references (DESIGN §6, §8.9)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import ratio_bounds

from gpas_probe.analysis.importance import (
    angular_distances,
    block_influence,
    deletion_importance,
    forward_skipping,
    layer_importance,
    naive_deletion_importance,
)
from gpas_probe.analysis.long import importance_over_training, to_long
from gpas_probe.checkpoints import save_checkpoint, step_loaders
from gpas_probe.config import ModelConfig
from gpas_probe.gpas import gpas_modules
from gpas_probe.model import IGNORE_INDEX, Transformer, build_model

SCHEMES = [
    dict(norm="pre", gpas=True),
    dict(norm="post", gpas=False),
    dict(norm="mixln", gpas=False, post_layers=2),
    dict(norm="sandwich", gpas=True, gpas_granularity="sublayer"),
    dict(norm="lns", gpas=False),
]


def _model(seed: int = 0, num_layers: int = 6, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_preset("tiny", num_layers=num_layers, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move gates and norm gains off their init so every slot matters
        for gate in gpas_modules(model):
            gate.alpha.fill_(float(torch.randn((), generator=g)))
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.startswith("layers.") and p.ndim == 2:  # branches big enough to matter
                p.normal_(0.0, 0.6 / math.sqrt(p.shape[1]), generator=g)
        model.lm_head.weight.normal_(0.0, 3.0 / math.sqrt(model.config.hidden_size), generator=g)  # peaked logits
    return model.eval()


def _padded(seed: int, lengths: list[int], T: int, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows: a row of ``k`` real tokens has targets at positions 0..k-2, -100 after."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    labels = torch.full((len(lengths), T), IGNORE_INDEX, dtype=torch.long)
    for i, k in enumerate(lengths):
        row = torch.randint(0, vocab, (k,), generator=g)
        ids[i, :k] = row
        labels[i, :k - 1] = row[1:]
    return ids, labels


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [_padded(1, [16, 9, 3], 16), _padded(2, [12, 12], 12), _padded(3, [5, 16, 1, 14], 16)]


def _sum_loss(model: Transformer, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    n = int((labels != IGNORE_INDEX).sum())
    with torch.no_grad():
        return float(model(ids, labels).loss) * n, n


def _sequence_losses(model: Transformer, batches) -> list[tuple[float, int]]:
    """(summed loss, targets) of every sequence with at least one target, batch by batch."""
    out = []
    for ids, labels in batches:
        for row in range(len(ids)):
            if (labels[row] != IGNORE_INDEX).any():
                out.append(_sum_loss(model, ids[row:row + 1], labels[row:row + 1]))
    return out


def _delete_and_rerun(model: Transformer, batches) -> tuple[float, list[float], list[tuple[float, float]]]:
    """Token-weighted losses of the full model and of true copies with one layer removed, and each
    deletion's 95% interval from the per-sequence loss differences."""
    def mean_loss(parts: list[tuple[float, int]]) -> float:
        return sum(s for s, _ in parts) / sum(n for _, n in parts)

    full = _sequence_losses(model, batches)
    deleted, bounds = [], []
    for layer in range(len(model.layers)):
        m = copy.deepcopy(model)
        del m.layers[layer]
        parts = _sequence_losses(m, batches)
        deleted.append(mean_loss(parts))
        bounds.append(ratio_bounds([d - b for (d, _), (b, _) in zip(parts, full, strict=True)], [n for _, n in full]))
    return mean_loss(full), deleted, bounds


def _states(model: Transformer, ids: torch.Tensor) -> list[torch.Tensor]:
    """h_0..h_L (float64), run block by block."""
    with torch.no_grad():
        x = model.embed_tokens(ids)
        cos, sin = model.rotary(ids.shape[1], x.dtype)
        out = [x.double()]
        for block in model.layers:
            x = block(x, cos, sin)
            out.append(x.double())
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))


# ------------------------------------------------------------------------------------------- deletion


def test_forward_skipping_without_skips_is_the_model() -> None:
    model = _model()
    ids, labels = _padded(0, [16, 7], 16)
    with torch.no_grad():
        h = forward_skipping(model, ids)
        loss = F.cross_entropy(model.lm_head(model.norm(h)).flatten(0, 1), labels.flatten(), ignore_index=-100)
        torch.testing.assert_close(loss, model(ids, labels).loss)
        torch.testing.assert_close(h, model.hidden_states(ids))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s["norm"] + ("+gpas" if s["gpas"] else ""))
def test_prefix_reuse_equals_delete_and_rerun(scheme: dict) -> None:
    model = _model(**scheme)
    batches = _batches()
    base, deleted, bounds = _delete_and_rerun(model, batches)
    fast = deletion_importance(model, iter(batches))  # a one-shot iterator: the pass streams
    slow = naive_deletion_importance(model, batches)
    assert list(fast.columns) == ["layer", "loss_deleted", "base_loss", "delta", "delta_lo", "delta_hi"]
    assert fast["layer"].tolist() == list(range(6))
    for df in (fast, slow):
        np.testing.assert_allclose(df["base_loss"], base, rtol=1e-5)
        np.testing.assert_allclose(df["loss_deleted"], deleted, rtol=1e-5)
        np.testing.assert_allclose(df["delta"], np.array(deleted) - base, atol=2e-5)
        np.testing.assert_allclose(df["delta_lo"], [lo for lo, _ in bounds], atol=5e-5)
        np.testing.assert_allclose(df["delta_hi"], [hi for _, hi in bounds], atol=5e-5)
    assert (fast["delta_lo"] < fast["delta"]).all() and (fast["delta"] < fast["delta_hi"]).all()
    # deleting a layer changes the loss: the reference is not trivially the base
    assert (fast["delta"].abs() > 1e-4).all()


def test_base_loss_is_token_weighted_over_batches() -> None:
    model = _model(norm="pre", gpas=True)
    a, b = _padded(4, [16, 2, 5], 16), _padded(5, [16], 16)  # very different token counts
    ids, labels = torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
    with torch.no_grad():
        pooled = float(model(ids, labels).loss)
    got = deletion_importance(model, [a, b])["base_loss"].iloc[0]
    assert got == pytest.approx(pooled, rel=1e-5)
    with torch.no_grad():
        unweighted = (float(model(*a).loss) + float(model(*b).loss)) / 2
    assert abs(got - unweighted) > 1e-4  # the two means differ, so the test can tell them apart


def test_batch_without_targets_is_skipped_and_all_empty_is_an_error() -> None:
    model = _model()
    good = _padded(6, [10, 4], 10)
    empty = (good[0], torch.full_like(good[1], IGNORE_INDEX))
    torch.testing.assert_close(
        torch.tensor(deletion_importance(model, [good, empty])["loss_deleted"].to_numpy()),
        torch.tensor(deletion_importance(model, [good])["loss_deleted"].to_numpy()),
    )
    with pytest.raises(ValueError, match="target"):
        deletion_importance(model, [empty])


def test_bad_batches_are_rejected_and_training_mode_restored() -> None:
    model = _model().train()
    ids, labels = _padded(0, [5], 5)
    with pytest.raises(ValueError, match="batch"):
        deletion_importance(model, [(ids,)])
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        deletion_importance(model, [(ids, labels[:, :3])])
    deletion_importance(model, [(ids, labels)])
    assert model.training


# -------------------------------------------------------------------------------------------- angular


def _angular_by_hand(model: Transformer, batches, use_mask: bool) -> dict[tuple[int, int], list[float]]:
    """Per (start, n): the angular distance at each sequence's last real token, sequence by sequence."""
    L = len(model.layers)
    per_sequence: dict[tuple[int, int], list[float]] = {}
    for batch in batches:
        ids, labels = batch[0], batch[1]
        real = batch[2] if use_mask else labels != IGNORE_INDEX
        hs = _states(model, ids)
        for b in range(ids.shape[0]):
            positions = [t for t in range(ids.shape[1]) if real[b, t]]
            if not positions:
                continue
            t = positions[-1]
            for start in range(L):
                for n in range(1, L - start + 1):
                    c = min(1.0, max(-1.0, _cos(hs[start][b, t], hs[start + n][b, t])))
                    per_sequence.setdefault((start, n), []).append(math.acos(c) / math.pi)
    return per_sequence


@pytest.mark.parametrize("use_mask", [False, True])
def test_angular_distances_by_hand(use_mask: bool) -> None:
    model = _model(norm="mixln", post_layers=2)
    batches = _batches()
    if use_mask:  # the explicit mask marks every real input token, including each row's last
        batches = [(ids, labels, torch.roll(labels != IGNORE_INDEX, 1, dims=1) | (labels != IGNORE_INDEX))
                   for ids, labels in batches]
        batches[0][2][:, 0] = True
    want = _angular_by_hand(model, batches, use_mask)
    df = angular_distances(model, batches)
    assert list(df.columns) == ["layer", "n", "distance", "distance_lo", "distance_hi"]
    got = {(int(r.layer), int(r.n)): r for r in df.itertuples()}
    assert set(got) == set(want) == {(lo, n) for lo in range(6) for n in range(1, 7 - lo)}
    for key, values in want.items():
        lo, hi = ratio_bounds(values, [1.0] * len(values))
        assert got[key].distance == pytest.approx(sum(values) / len(values), abs=1e-6), key
        assert (got[key].distance_lo, got[key].distance_hi) == pytest.approx((lo, hi), abs=1e-6), key
    assert ((df["distance"] >= 0) & (df["distance"] <= 1)).all()


def test_angular_mask_changes_the_last_token() -> None:
    model = _model()
    ids, labels = _padded(7, [8, 5], 10)
    mask = ids != 0
    mask[:, :1] = True
    with_targets = angular_distances(model, [(ids, labels)])["distance"].to_numpy()
    with_mask = angular_distances(model, [(ids, labels, mask)])["distance"].to_numpy()
    assert not np.allclose(with_targets, with_mask)


def test_angular_rows_normalized_min_max() -> None:
    model = _model(norm="pre", gpas=True)
    df = angular_distances(model, _batches(), normalize_rows=True)
    plain = angular_distances(model, _batches())
    np.testing.assert_allclose(df["distance"], plain["distance"])
    assert ((df["distance_norm"] >= 0) & (df["distance_norm"] <= 1)).all()
    for n, row in df.groupby("n"):
        d = row["distance"].to_numpy()
        if len(d) == 1:
            assert row["distance_norm"].iloc[0] == 0.0
            continue
        np.testing.assert_allclose(row["distance_norm"], (d - d.min()) / (d.max() - d.min()), atol=1e-12)
        assert row["distance_norm"].min() == 0.0 and row["distance_norm"].max() == pytest.approx(1.0), n


# ------------------------------------------------------------------------------------- block influence


@pytest.mark.parametrize("skip_first", [False, True])
def test_block_influence_by_hand(skip_first: bool) -> None:
    model = _model(norm="post")
    batches = _batches()
    L = len(model.layers)
    per_sequence: list[tuple[list[float], int]] = []  # (summed cosine per layer, tokens) of each sequence
    for ids, labels in batches:
        hs = _states(model, ids)
        for b in range(len(ids)):
            positions = [t for t in range(ids.shape[1]) if labels[b, t] != IGNORE_INDEX and (t or not skip_first)]
            sums = [sum(_cos(hs[layer][b, t], hs[layer + 1][b, t]) for t in positions) for layer in range(L)]
            if positions:  # a sequence without a counted token carries no information
                per_sequence.append((sums, len(positions)))
    n = [count for _, count in per_sequence]
    if skip_first:
        df = layer_importance(model, batches, skip_first_position=True)["block_influence"]
    else:
        df = block_influence(model, batches)
    assert list(df.columns) == ["layer", "influence", "influence_lo", "influence_hi"]
    for layer in range(L):
        cos = [sums[layer] for sums, _ in per_sequence]
        lo, hi = ratio_bounds(cos, n)
        assert df["influence"][layer] == pytest.approx(1 - sum(cos) / sum(n), abs=1e-6)
        assert (df["influence_lo"][layer], df["influence_hi"][layer]) == pytest.approx((1 - hi, 1 - lo), abs=1e-6)


def test_one_pass_matches_the_separate_analyses() -> None:
    model = _model(norm="pre", gpas=True)
    out = layer_importance(model, iter(_batches()), normalize_rows=True)
    pd.testing.assert_frame_equal(out["deletion"], deletion_importance(model, _batches()))
    pd.testing.assert_frame_equal(out["angular"], angular_distances(model, _batches(), normalize_rows=True))
    pd.testing.assert_frame_equal(out["block_influence"], block_influence(model, _batches()))


# ---------------------------------------------------------------------------------- over training/long


def test_importance_over_training_loads_one_model_at_a_time(tmp_path) -> None:
    models = [_model(seed=s, num_layers=3) for s in (10, 11)]
    alive: list[int] = []

    def loader(i: int):
        def load() -> Transformer:
            alive.append(i)
            return models[i]
        return load

    df = importance_over_training([(100, loader(0)), (200, loader(1))], _batches)
    assert alive == [0, 1]
    assert df["step"].tolist() == [100] * 3 + [200] * 3
    for i, step in enumerate((100, 200)):
        want = deletion_importance(models[i], _batches())
        got = df[df["step"] == step].drop(columns="step").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want)

    for i, step in enumerate((20, 5)):
        save_checkpoint(models[i], tmp_path / "checkpoints" / f"step_{step:06d}", step=step)
    assert [s for s, _ in step_loaders(tmp_path)] == [5, 20]
    from_disk = importance_over_training(step_loaders(tmp_path), _batches, analysis=block_influence)
    assert from_disk["step"].tolist() == [5] * 3 + [20] * 3
    np.testing.assert_allclose(from_disk[from_disk["step"] == 20]["influence"],
                               block_influence(models[0], _batches())["influence"], atol=1e-6)
    with pytest.raises(FileNotFoundError):
        step_loaders(tmp_path / "missing")


DTYPES = {"step": "int64", "layer": "int16", "value": "float64"}


def _check_schema(long: pd.DataFrame) -> None:
    assert list(long.columns) == ["run_id", "step", "layer", "site", "direction", "stat", "value"]
    for col, dtype in DTYPES.items():
        assert long[col].dtype == dtype, col
    for col in ("run_id", "site", "direction", "stat"):
        assert pd.api.types.is_string_dtype(long[col]), col
        assert all(isinstance(v, str) for v in long[col])
    assert (long["direction"] == "none").all()


def test_to_long() -> None:
    model = _model(norm="pre", gpas=True, num_layers=4)
    out = layer_importance(model, _batches(), normalize_rows=True)

    dele = to_long(out["deletion"], "run-a", 7)
    _check_schema(dele)
    assert (dele["run_id"] == "run-a").all() and (dele["step"] == 7).all()
    delta = dele[dele["stat"] == "deletion_delta"]
    assert delta["layer"].tolist() == [0, 1, 2, 3] and (delta["site"] == "importance").all()
    np.testing.assert_array_equal(delta["value"], out["deletion"]["delta"])
    loss = dele[dele["stat"] == "deletion_loss"]
    np.testing.assert_array_equal(loss["value"], out["deletion"]["loss_deleted"])
    base = dele[dele["stat"] == "val_loss"]
    assert len(base) == 1 and base["layer"].item() == -1 and base["site"].item() == "model"
    assert base["value"].item() == out["deletion"]["base_loss"].iloc[0]

    for stat in ("deletion_delta_lo", "deletion_delta_hi"):
        np.testing.assert_array_equal(dele[dele["stat"] == stat]["value"], out["deletion"][stat.split("_", 1)[1]])

    bi = to_long(out["block_influence"], "run-a", 7)
    _check_schema(bi)
    assert set(bi["stat"]) == {"block_influence", "block_influence_lo", "block_influence_hi"} and len(bi) == 12
    np.testing.assert_array_equal(bi[bi["stat"] == "block_influence_hi"]["value"],
                                  out["block_influence"]["influence_hi"])

    ang = to_long(out["angular"], "run-a", 7)
    _check_schema(ang)
    assert len(ang) == 4 * len(out["angular"])
    row = ang[(ang["site"] == "angular_n2") & (ang["layer"] == 1) & (ang["stat"] == "angular_distance")]
    want = out["angular"].query("n == 2 and layer == 1")["distance"].item()
    assert row["value"].item() == want
    assert set(ang["stat"]) == {"angular_distance", "angular_distance_lo", "angular_distance_hi",
                                "angular_distance_norm"}

    over = importance_over_training([(3, model), (9, model)], _batches)
    long = to_long(over, "run-b")
    _check_schema(long)
    assert sorted(long[long["stat"] == "val_loss"]["step"].tolist()) == [3, 9]

    with pytest.raises(ValueError, match="step"):
        to_long(out["deletion"], "run-a")
    with pytest.raises(ValueError, match="columns"):
        to_long(pd.DataFrame({"layer": [0], "foo": [1.0]}), "run-a", 0)

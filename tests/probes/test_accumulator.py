"""The accumulator's reduction over ranks, in one process: two accumulators stand for two ranks (the real
collective under torchrun is tested in ``tests/distributed/``)."""

from __future__ import annotations

import math

import pytest
import torch

from gpas_probe.probes.accumulator import MAX, SUM, Accumulator


def _two_ranks(a: Accumulator, b: Accumulator) -> dict:
    """Collect ``a`` as rank 0 of a world whose rank 1 holds ``b``; the MAX of this fake backend drops
    NaNs (as a backend's max may), the SUM is a plain sum."""
    seen: dict = {}

    def capture(s: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen["b"] = (s.clone(), m.clone())
        return s, m

    b.collect(capture)
    return a.collect(lambda s, m: (s + seen["b"][0], torch.fmax(m, seen["b"][1])))


def _rank(x: torch.Tensor, shard: torch.Tensor) -> Accumulator:
    acc = Accumulator()
    acc.add((0, "resid_pre", "fwd", "n"), x.shape[0])  # a host number
    acc.add((0, "resid_pre", "fwd", "sq"), x.pow(2).sum())
    acc.max((0, "resid_pre", "fwd", "absmax"), x.abs().max())
    acc.set((0, "resid_pre", "fwd", "hidden"), x.shape[-1])
    acc.set(("grad_sq", 0), shard.pow(2).sum(), reduce=SUM)  # a rank's shard of a parameter
    acc.set(("grad", 1), torch.tensor(0.25))  # replicated
    return acc


def test_reduction_sums_maxes_and_keeps_replicated_values() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1, w = torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(6, 4, generator=g)
    got = _two_ranks(_rank(x0, w[:3]), _rank(x1, w[3:]))
    both = torch.cat([x0, x1]).double()
    assert got[(0, "resid_pre", "fwd", "n")] == 8 and got[(0, "resid_pre", "fwd", "hidden")] == 8
    assert got[(0, "resid_pre", "fwd", "sq")] == pytest.approx(both.pow(2).sum().item(), rel=1e-6)
    assert got[(0, "resid_pre", "fwd", "absmax")] == pytest.approx(both.abs().max().item(), rel=1e-6)
    assert got[("grad_sq", 0)] == pytest.approx(w.double().pow(2).sum().item(), rel=1e-6)
    assert got[("grad", 1)] == 0.25


def test_reduction_keeps_a_nan_of_one_rank_and_refuses_mismatched_keys() -> None:
    x = torch.ones(2, 4)
    spoiled = x.clone()
    spoiled[0, 0] = math.nan
    got = _two_ranks(_rank(x, x), _rank(spoiled, x))
    assert math.isnan(got[(0, "resid_pre", "fwd", "absmax")]) and math.isnan(got[(0, "resid_pre", "fwd", "sq")])

    other = _rank(x, x)
    other.set(("grad", 2), torch.tensor(0.25))  # same number of values, other keys
    mine = _rank(x, x)
    mine.set(("grad", 3), torch.tensor(0.25))
    with pytest.raises(RuntimeError, match="different probe statistics"):
        _two_ranks(mine, other)


def test_blocks_combine_over_passes_as_single_values_do() -> None:
    g = torch.Generator().manual_seed(1)
    keys = [(layer, "resid_post", "fwd", "sq") for layer in range(3)]
    passes = [torch.randn(3, generator=g) for _ in range(2)]
    blocks, singles = Accumulator(), Accumulator()
    for values in passes:
        blocks.add_block("sq", keys, values)
        blocks.add_block("top", [k[:3] + ("top",) for k in keys], values, MAX)
        blocks.argmax_block("loc", [k[:3] + ("loc",) for k in keys], values, torch.stack([values * 10, values], -1))
        for key, v in zip(keys, values, strict=True):
            singles.add(key, v)
            singles.max(key[:3] + ("top",), v)
            singles.argmax(key[:3] + ("loc",), v, (v * 10, v))
    assert blocks.collect() == pytest.approx(singles.collect(), rel=1e-12)
    blocks.add_block("sq", keys[:2], passes[0][:2])  # a pass that saw fewer sites still adds up
    assert blocks.collect()[keys[0]] == pytest.approx(float(passes[0][0] * 2 + passes[1][0]), rel=1e-6)


def test_set_blocks_replace_and_blocks_reduce_over_ranks() -> None:
    a, b = Accumulator(), Accumulator()
    for acc, shard in ((a, torch.tensor([1.0, 2.0])), (b, torch.tensor([3.0, 4.0]))):
        acc.set_block("grad_sq", [("grad_sq", 0), ("grad_sq", 1)], shard * 100, SUM)
        acc.set_block("grad_sq", [("grad_sq", 0), ("grad_sq", 1)], shard, SUM)  # the latest wins
        acc.add_block("n", [(0, "resid_pre", "fwd", "n")], torch.tensor([5.0]))
        acc.add_block("top", [(0, "resid_pre", "fwd", "absmax")], shard[:1], MAX)
    got = _two_ranks(a, b)
    assert got[("grad_sq", 0)] == 4.0 and got[("grad_sq", 1)] == 6.0
    assert got[(0, "resid_pre", "fwd", "n")] == 10.0 and got[(0, "resid_pre", "fwd", "absmax")] == 3.0


@pytest.mark.parametrize("order", [("a", "b", "a"), ("a", "b", "a", "b", "a"), ("b", "a", "a")])
def test_blocks_of_alternating_keys_add_up_as_single_values_do(order) -> None:
    """Passes that see key sets A, B, A: the third pass adds to what the first two left as single values
    (it used to start a fresh block that replaced them)."""
    keys = {"a": [("x", 0), ("x", 1)], "b": [("x", 1), ("x", 2)]}
    g = torch.Generator().manual_seed(3)
    passes = [(name, torch.rand(2, generator=g), torch.rand(2, generator=g), torch.randint(0, 9, (2, 2),
                                                                                           generator=g))
              for name in order]
    blocks, singles = Accumulator(), Accumulator()
    for name, add, peak, where in passes:
        blocks.add_block("n", keys[name], add)
        blocks.argmax_block("top", [k + ("max",) for k in keys[name]], peak, where)
        for i, key in enumerate(keys[name]):
            singles.add(key, add[i])
            singles.argmax(key + ("max",), peak[i], tuple(where[i].unbind()))
    got, want = blocks.collect(), singles.collect()
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key]), key

"""Shortcut/branch ratio and cosine per sub-layer against their brute-force twin."""

from __future__ import annotations

from probe_reference import assert_rows, family_case


def test_shortcut_branch_statistics_match_brute_force(case: str, grads_at_backward_end: bool) -> None:
    got, exp, rtol = family_case("ratios", case, grads_at_backward_end)
    assert_rows(got, exp, rtol)

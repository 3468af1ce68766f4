"""GPAS gate statistics (alpha, SiLU(alpha), scale, alpha's gradient) against their brute-force twin."""

from __future__ import annotations

from probe_reference import CASES, assert_rows, family_case


def test_gate_statistics_match_brute_force(case: str, grads_at_backward_end: bool) -> None:
    got, exp, rtol = family_case("gpas", case, grads_at_backward_end)
    assert_rows(got, exp, rtol)
    gated = CASES[case][1].get("gpas", False)
    assert bool(exp) == gated  # a case with gates has rows for them, four per gate

"""Model-level rows (loss, learning rate, gradient norm, tokens, validation loss) against the step's values."""

from __future__ import annotations

from probe_reference import assert_rows, family_case


def test_model_rows_are_the_steps_values(case: str, grads_at_backward_end: bool) -> None:
    got, exp, rtol = family_case("model", case, grads_at_backward_end)
    assert_rows(got, exp, rtol)

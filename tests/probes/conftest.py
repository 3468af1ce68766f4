"""Every probe test runs each model case with parameter gradients read by hooks and at the backward's end."""

from __future__ import annotations

import pytest
from probe_reference import CASES


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=[False, True], ids=["grad-hooks", "grads-at-backward-end"])
def grads_at_backward_end(request: pytest.FixtureRequest) -> bool:
    return request.param

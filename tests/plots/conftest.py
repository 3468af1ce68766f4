"""Synthetic runs shared by the plot tests."""

from __future__ import annotations

import pandas as pd
import pytest
from plot_tables import synthetic


@pytest.fixture(scope="module")
def two_runs() -> pd.DataFrame:
    return synthetic()


@pytest.fixture(scope="module")
def one_run(two_runs) -> pd.DataFrame:
    return two_runs[two_runs.run_id == "gpas"]

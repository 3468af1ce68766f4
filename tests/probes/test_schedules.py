"""Schedules: which steps each records."""

from __future__ import annotations

import pytest

from gpas_probe.probes import Every, LogSpaced, ProbeConfig, Steps, make_schedule


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

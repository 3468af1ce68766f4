"""How this process was started decides which ``--dist`` modes it may use (``check_launch``)."""

from __future__ import annotations

import pytest

from gpas_probe.distributed import TORCHRUN_ENV, check_launch, torchrun_world_size


def _torchrun(monkeypatch: pytest.MonkeyPatch, world: int) -> None:
    for name, value in zip(TORCHRUN_ENV, ("0", str(world), "0", "127.0.0.1", "29500"), strict=True):
        monkeypatch.setenv(name, value)


def test_one_plain_process_may_use_any_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert torchrun_world_size() is None
    for mode in ("none", "ddp", "fsdp"):
        check_launch(mode)  # ddp/fsdp without torchrun are refused later, when the group is joined
    with pytest.raises(ValueError, match="unknown --dist 'zero3'; choose one of none, ddp, fsdp"):
        check_launch("zero3")


def test_a_plain_run_under_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _torchrun(monkeypatch, 2)
    assert torchrun_world_size() == 2
    with pytest.raises(ValueError, match="one of 2 torchrun processes: pass --dist ddp or --dist fsdp"):
        check_launch("none")
    check_launch("ddp")
    _torchrun(monkeypatch, 1)
    check_launch("none")  # torchrun with one process trains alone: nothing to share

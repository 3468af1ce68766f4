"""The ``Trainer`` callback hands each recorded step's summary to the Trainer's own logging: it lands in
``state.log_history`` at the recorded step (with ``report_to`` off), and with ``report_to=["tensorboard"]``
in the Trainer's TensorBoard files, the last recorded step included (logged before the integrations close)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import SEQ, V, tiny_llama  # noqa: E402
from logger_readback import assert_same, expected_summaries  # noqa: E402

from gpas_probe.hf.callback import GpasProbeCallback  # noqa: E402
from gpas_probe.store import load_run  # noqa: E402


def _dataset(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(3, V, (SEQ,), generator=g)), "labels": ids} for _ in range(n)]


def _train(tmp_path: Path, report_to: list[str], **kw) -> tuple[transformers.Trainer, GpasProbeCallback]:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
        eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=2, logging_steps=1, save_strategy="no",
        report_to=report_to, use_cpu=True, disable_tqdm=True, seed=0)
    callback = GpasProbeCallback(tmp_path / "run", every=2, **kw)
    trainer = transformers.Trainer(model=tiny_llama().train(), args=args, train_dataset=_dataset(8),
                                   eval_dataset=_dataset(2), callbacks=[callback])
    trainer.train()
    return trainer, callback


def _summaries(history: list[dict[str, float]], prefix: str = "gpas/") -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for entry in history:
        mine = {k.removeprefix("train/"): v for k, v in entry.items() if k.removeprefix("train/").startswith(prefix)}
        if mine:
            assert entry["step"] not in out, f"step {entry['step']} logged twice"
            out[int(entry["step"])] = mine
    return out


def test_summaries_land_in_the_log_history_at_their_steps(tmp_path: Path) -> None:
    trainer, callback = _train(tmp_path, [])
    assert callback.trainer is trainer  # found on the call stack
    want = expected_summaries(load_run(tmp_path / "run"))
    assert sorted(want) == [1, 2, 4] and "gpas/model/val_loss" in want[2] and "gpas/model/val_loss" in want[4]
    assert_same(_summaries(trainer.state.log_history), want)
    assert "train_runtime" in trainer.state.log_history[-2]  # the last summary follows the Trainer's final log


def test_summaries_reach_report_to(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from logger_readback import read_tensorboard

    trainer, _ = _train(tmp_path, ["tensorboard"])
    events = sorted((tmp_path / "trainer").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events  # one writer: nothing was logged after the integration closed
    got, acc = read_tensorboard(events[0].parent, prefix="train/gpas/")  # filed under train/, as the Trainer's
    assert "train/loss" in acc.Tags()["scalars"]
    mine = {step: {k.removeprefix("train/"): v for k, v in tags.items()} for step, tags in got.items()}
    want = expected_summaries(load_run(tmp_path / "run"))
    assert_same(mine, want, cast=lambda v: float(np.float32(v)))


def test_log_summaries_off_leaves_the_trainer_logs_alone(tmp_path: Path) -> None:
    trainer, callback = _train(tmp_path, [], log_summaries=False)
    assert callback.trainer is None and _summaries(trainer.state.log_history) == {}
    assert sorted(set(load_run(tmp_path / "run").query("layer >= 0").step)) == [1, 2, 4]

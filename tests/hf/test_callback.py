"""Training Hugging Face models with the probes: ``attach`` in a plain loop and the ``Trainer`` callback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    SEQ,
    V,
    check_stats,
    ids,
    stats,
    tiny_llama,
    value,
)

import gpas_probe  # noqa: E402
from gpas_probe import hf  # noqa: E402
from gpas_probe.cli.main import app  # noqa: E402
from gpas_probe.hf.callback import GpasProbeCallback  # noqa: E402
from gpas_probe.probes import ACTIVATION_SITES, Every  # noqa: E402
from gpas_probe.store import load_run  # noqa: E402

runner = CliRunner()


def test_attach_in_a_plain_loop_writes_a_run(tmp_path: Path) -> None:
    model = tiny_llama().train()
    hf.instrument(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = gpas_probe.attach(model, out=tmp_path / "run", every=2, optimizer=optimizer)
    losses = {}
    for step in range(1, 6):
        x = ids(2, 12, seed=step)
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        probe.step(step, loss=loss)
        losses[step] = float(loss.detach())
    probe.close()
    df = gpas_probe.load_run(tmp_path / "run")
    steps = [s for s in range(1, 6) if Every(2)(s)]
    assert sorted(set(df[df.layer >= 0].step)) == steps
    assert sorted(set(df.step)) == [1, 2, 3, 4, 5]  # the loss (a CPU tensor here) on every step
    for s in range(1, 6):
        assert value(df[df.step == s], -1, "model", "none", "loss") == pytest.approx(losses[s], rel=1e-6)
    assert set(ACTIVATION_SITES) <= set(df.site) and df.value.notna().all()
    assert gpas_probe.probes.read_meta(tmp_path / "run")["model_config"]["model_type"] == "llama"


def _dataset(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, V, (SEQ,), generator=g)
        mask = torch.ones(SEQ, dtype=torch.long)
        mask[SEQ - 1 - i % 4:] = 0 if i % 2 else 1  # some rows right-padded
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def test_trainer_callback_writes_a_run_that_plots(tmp_path: Path) -> None:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        per_device_eval_batch_size=4, learning_rate=1e-3, eval_strategy="steps", eval_steps=2, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    callback = GpasProbeCallback(tmp_path / "run", every=2)
    model = tiny_llama().train()
    first: list[tuple[torch.Tensor, torch.Tensor]] = []  # (embeddings, attention mask) of step 1's micro-batches
    masks: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, a, kw: masks.append(kw["attention_mask"]) if m.training else None,
                                    with_kwargs=True)
    model.model.embed_tokens.register_forward_hook(
        lambda m, a, out: first.append((out.detach(), masks[-1].bool())) if m.training and len(first) < 2 else None)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(16, 0),
                                   eval_dataset=_dataset(4, 1), callbacks=[callback])
    trainer.train()
    assert callback.probe is None and not model._forward_hooks and len(model._forward_pre_hooks) == 1  # ours only

    df = load_run(tmp_path / "run")
    assert sorted(set(df[df.layer >= 0].step)) == [1, 2, 4]
    assert sorted(set(df.step)) == [1, 2, 3, 4]  # model rows on every step
    logs = {(h["step"], k): v for h in trainer.state.log_history for k, v in h.items()}
    for step in (1, 2, 4):
        rows = df[df.step == step]
        assert value(rows, -1, "model", "none", "loss") == pytest.approx(logs[(step, "loss")], rel=1e-6)
        assert value(rows, -1, "model", "none", "grad_norm") == pytest.approx(logs[(step, "grad_norm")], rel=1e-5)
        assert value(rows, -1, "model", "none", "lr") == pytest.approx(logs[(step, "learning_rate")], rel=1e-6)
        assert set(ACTIVATION_SITES) <= set(rows.site)
    for step in (2, 4):
        assert value(df[df.step == step], -1, "model", "none", "val_loss") == pytest.approx(
            logs[(step, "eval_loss")], rel=1e-5)
    assert df.value.notna().all()
    # step 1 pools its two micro-batches and leaves padding out: layer 0's input is the embedding output
    assert not all(bool(m.all()) for _, m in first)
    check_stats(df[df.step == 1], 0, "resid_pre", "fwd", stats([e for e, _ in first], [m for _, m in first]))

    png = tmp_path / "variance.png"
    res = runner.invoke(app, ["plot", "variance", str(tmp_path / "run"), "-o", str(png)])
    assert res.exit_code == 0, res.output
    assert png.is_file() and png.stat().st_size > 0

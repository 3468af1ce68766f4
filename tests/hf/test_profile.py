"""Profiles of Hugging Face checkpoints through transformers: the CLI falls back to it, a LLaMA profiled
either way gives the same rows, and the backends' errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    BS,
    KEY,
    NB,
    SEQ,
    H,
    V,
    check_stats,
    stats,
    tiny_gpt2,
    tiny_llama,
    token_file,
    value,
)

import gpas_probe  # noqa: E402
from gpas_probe import hf  # noqa: E402
from gpas_probe.analysis.importance import layer_importance as native_importance  # noqa: E402
from gpas_probe.checkpoints import load_checkpoint  # noqa: E402
from gpas_probe.cli.main import app  # noqa: E402
from gpas_probe.evaldata import load_eval_data  # noqa: E402
from gpas_probe.profile import ProfileConfig, profile_many, profile_model  # noqa: E402
from gpas_probe.store import load_run  # noqa: E402

runner = CliRunner()


def test_cli_profile_falls_back_to_transformers(tmp_path: Path) -> None:
    """GPT-2 is not native: ``gpas-probe profile`` loads it with transformers. resid_pre (every layer)
    and resid_post (all but the last, whose output HF reports after ln_f) match the model's own
    ``output_hidden_states`` and their gradients; val_loss and deletion importance match a model
    whose layer list lacks the deleted layer."""
    ckpt = tmp_path / "gpt2-tiny"
    tiny_gpt2().save_pretrained(ckpt)
    data_path = token_file(tmp_path, 5 * SEQ + 8)  # 5 full windows and a padded one
    out = tmp_path / "profiles"
    res = runner.invoke(app, ["profile", str(ckpt), "--out", str(out), "--data", str(data_path), "--batches", "3",
                              "--batch-size", str(BS), "--seq-len", str(SEQ)])
    assert res.exit_code == 0, res.output
    df = load_run(out / "gpt2-tiny")

    model = transformers.GPT2LMHeadModel.from_pretrained(ckpt).eval()
    data = load_eval_data(data_path)
    batches = list(data.batches(BS, SEQ, 3))
    assert batches[-1][2].sum() < batches[-1][2].numel()
    n_targets = data.num_targets(BS, SEQ, 3)
    fwd: dict[int, list] = {i: [] for i in range(3)}
    bwd: dict[int, list] = {i: [] for i in range(3)}
    masks, loss_sum = [], 0.0
    for ids, labels, mask in batches:
        out_ = model(ids, output_hidden_states=True, use_cache=False)
        loss = F.cross_entropy(out_.logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        grads = torch.autograd.grad(loss / n_targets, out_.hidden_states[:2])
        for i in range(2):
            fwd[i].append(out_.hidden_states[i].detach())
            bwd[i].append(grads[i])
        masks.append(mask)
        loss_sum += float(loss.detach())
    for layer in range(2):
        check_stats(df, layer, "resid_pre", "fwd", stats(fwd[layer], masks))
        check_stats(df, layer, "resid_pre", "bwd", stats(bwd[layer], masks))
    check_stats(df, 0, "resid_post", "fwd", stats(fwd[1], masks))
    check_stats(df, 0, "resid_post", "bwd", stats(bwd[1], masks))
    base = loss_sum / n_targets
    assert value(df, -1, "model", "none", "val_loss") == pytest.approx(base, rel=1e-6)

    blocks = model.transformer.h
    with torch.no_grad():
        for layer in range(2):
            model.transformer.h = torch.nn.ModuleList(b for i, b in enumerate(blocks) if i != layer)
            deleted = sum(float(F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                reduction="sum")) for ids, labels, _ in batches) / n_targets
            # a difference of two float32 losses of about 4 nats: exact to a few 1e-6 nats, whatever the order
            # of summation (the profile sums per-sequence losses in float64)
            assert value(df, layer, "importance", "none", "deletion_delta") == pytest.approx(deleted - base, abs=5e-6)
    assert {"attn_out", "resid_mid", "mlp_out", "attn", "mlp", "angular_n1"} <= set(df.site)  # GPT2Block is known


def test_hf_profile_equals_native_profile_of_the_same_llama(tmp_path: Path) -> None:
    """A LLaMA checkpoint profiled through transformers gives the rows (every site, ratios, parameter
    norms, importance, validation loss) the native loader's model gives."""
    ckpt = tmp_path / "llama"
    tiny_llama().save_pretrained(ckpt)
    data = load_eval_data(token_file(tmp_path, 2 * SEQ * BS + 3))
    native = load_checkpoint(ckpt, dtype=torch.float64)
    ours = hf.load_hf_causal_lm(ckpt, dtype=torch.float64)
    config = ProfileConfig.of(batches=NB + 1, batch_size=BS, seq_len=SEQ)
    want = profile_model(native, data, config, step=7).set_index(KEY).value.sort_index()
    got = profile_model(ours, data, config, step=7).set_index(KEY).value.sort_index()
    assert not hf.is_instrumented(ours)  # instrumented only for the call
    assert got.index.equals(want.index) and len(got) > 100
    # both compute RoPE tables in fp32 (by a product and by an outer product): float64 agrees to ~1e-7;
    # a deletion delta is a difference of two losses of about 4 nats, so it agrees to ~1e-8 absolute
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-6, atol=1e-8)

    direct = hf.layer_importance(ours, data.batches(BS, SEQ, NB), normalize_rows=True)
    ref = native_importance(native, data.batches(BS, SEQ, NB), normalize_rows=True)
    for name in ("deletion", "angular", "block_influence"):
        pd.testing.assert_frame_equal(direct[name], ref[name], rtol=1e-6)


def test_profile_backends_and_errors(tmp_path: Path) -> None:
    ckpt = tmp_path / "gpt2-tiny"
    tiny_gpt2().save_pretrained(ckpt)
    kw = dict(data=token_file(tmp_path, 200), batches=1, batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' is not supported natively"):
        profile_many([ckpt], tmp_path / "a", ProfileConfig.of(backend="native", **kw))
    with pytest.raises(ValueError, match="applies only to checkpoints loaded natively"):
        profile_many([ckpt], tmp_path / "a", ProfileConfig.of(norm="post", **kw))
    with pytest.raises(ValueError, match="unknown backend"):
        profile_many([ckpt], tmp_path / "a", ProfileConfig.of(backend="jax", **kw))
    native = tmp_path / "ours"
    gpas_probe.save_checkpoint(gpas_probe.build_model(gpas_probe.ModelConfig(
        vocab_size=V, hidden_size=H, intermediate_size=64, num_layers=2, num_heads=2, gpas=True)), native)
    with pytest.raises(ValueError, match="the weights do not match LlamaForCausalLM.*gpas"):
        profile_many([native], tmp_path / "a", ProfileConfig.of(backend="hf", **kw))  # gates are no LLaMA weights
    (run,) = profile_many([native], tmp_path / "b", ProfileConfig.of(backend="auto", importance=False, **kw))
    assert "gpas" in set(load_run(run).site)  # ours load natively
    assert not (tmp_path / "a").exists()

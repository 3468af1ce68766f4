"""The streamed profile (one layer's weights in memory at a time, ``LoadSpec(stream=True)``) against the
in-memory profile of the same checkpoint: every row equal, for several schemes, tied and untied
embeddings, our checkpoints and a Hugging Face LLaMA one; what cannot stream says so in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gpas_probe.checkpoints import load
from gpas_probe.checkpoints.native import save_checkpoint
from gpas_probe.config import ModelConfig
from gpas_probe.evaldata import EvalData
from gpas_probe.model import build_model
from gpas_probe.profile import ProfileConfig, profile_many, profile_model
from gpas_probe.profile.streamed import open_streamed, profile_streamed
from gpas_probe.store import load_run

KEY = ["layer", "site", "direction", "stat"]


def _data(vocab: int, padded: bool = False) -> EvalData:
    n = 2 * 3 * 16 + 1 - (7 if padded else 0)  # padded: the last window is short
    tokens = np.random.default_rng(0).integers(0, vocab, n).astype(np.int64)
    return EvalData("random", tokens, "tokens", "random")


def _assert_same_rows(memory, streamed) -> None:
    a, b = memory.set_index(KEY)["value"], streamed.set_index(KEY)["value"]
    assert not a.index.duplicated().any() and not b.index.duplicated().any()
    assert set(a.index) == set(b.index)
    b = b.reindex(a.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=2e-5, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize(("overrides", "deletion", "padded"), [
    (dict(gpas=True, tie_embeddings=True), "both", False),
    (dict(norm="mixln", post_layers=1), "exact", True),
    (dict(norm="sandwich", gpas=True), "estimate", False),
])
def test_streamed_profile_equals_the_in_memory_one(tmp_path: Path, overrides: dict, deletion: str,
                                                   padded: bool) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny", **overrides))
    ckpt = save_checkpoint(model, tmp_path / "ck", step=7)
    data = _data(model.config.vocab_size, padded)
    config = ProfileConfig.of(batches=2, batch_size=3, seq_len=16, deletion=deletion)
    memory = profile_model(load(ckpt).model, data, config, step=7)
    units = []
    streamed = profile_streamed(open_streamed(ckpt), data, config, step=7, on_unit=units.append)
    _assert_same_rows(memory, streamed)
    stats = set(streamed["stat"])
    assert {"grad_norm", "var", "block_influence"} <= stats
    assert ("deletion_estimate" in stats) == (deletion != "exact")
    assert ("deletion_delta" in stats) == (deletion != "estimate")
    assert ("alpha_grad" in stats) == bool(overrides.get("gpas"))
    assert units == ["forward sweep"] * 4 + ["head"] + ["reverse sweep"] * 4


def test_importance_only_streams_without_a_reverse_sweep(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model(ModelConfig.from_preset("tiny"))
    ckpt = save_checkpoint(model, tmp_path / "ck")
    data = _data(model.config.vocab_size)
    config = ProfileConfig.of(batches=2, batch_size=3, seq_len=16, activations=False)
    units = []
    streamed = profile_streamed(open_streamed(ckpt), data, config, on_unit=units.append)
    _assert_same_rows(profile_model(load(ckpt).model, data, config), streamed)
    assert units == ["forward sweep"] * 4 + ["head"]


def test_a_hugging_face_llama_checkpoint_streams(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "llama")
    data = _data(96)
    profile = ProfileConfig.of(batches=2, batch_size=3, seq_len=16, dtype="fp32")
    streamed = open_streamed(tmp_path / "llama", dtype=torch.float32)
    assert streamed.model.config.num_kv_heads == 2 and streamed.model.config.tie_embeddings
    _assert_same_rows(profile_model(load(tmp_path / "llama", dtype="fp32").model, data, profile),
                      profile_streamed(streamed, data, profile))
    assert open_streamed(tmp_path / "llama").dtype == torch.bfloat16  # as stored, by default


def test_profile_many_streams_into_the_same_rows(tmp_path: Path, tiny_gpas_run: Path, short_text: Path) -> None:
    options = dict(data=short_text, batches=2, batch_size=2, seq_len=16, device="cpu")
    seen = []
    (a,) = profile_many([tiny_gpas_run], tmp_path / "memory", ProfileConfig.of(**options), latest=True)
    (b,) = profile_many([tiny_gpas_run], tmp_path / "streamed", ProfileConfig.of(stream=True, **options),
                        latest=True, callback=seen.append)
    _assert_same_rows(load_run(a), load_run(b))
    work = [e for e in seen if e.phase not in ("data", "loading")]
    assert [e.completed for e in work] == list(range(1, 10)) and {e.total for e in work} == {9}


def test_what_cannot_stream_says_so(tmp_path: Path) -> None:
    model = build_model(ModelConfig.from_preset("tiny"))
    ckpt = save_checkpoint(model, tmp_path / "ck")
    torch.save({k: v for k, v in model.state_dict().items()}, tmp_path / "ck" / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="streaming reads safetensors weights"):
        open_streamed(ckpt)
    with pytest.raises(ValueError, match="not with the hf backend"):
        ProfileConfig.of(stream=True, backend="hf")

"""A checkpoint shaped like a real pretrained LLaMA-family model (32 layers, grouped-query attention, tied
embeddings, a 50k vocabulary, stored in bf16), saved by transformers and loaded natively, with a sink
injected at position 0 from layer 11 on: the diagnosis names it at every evaluation size, reads the
variance without it, and its verdict does not flip between 512 and 2,048 tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from gpas_probe.analysis import diagnose  # noqa: E402
from gpas_probe.checkpoints import load  # noqa: E402
from gpas_probe.evaldata import EvalData  # noqa: E402
from gpas_probe.profile import ProfileConfig, profile_model  # noqa: E402
from gpas_probe.table import layer_rows, select  # noqa: E402

LAYERS, VOCAB, SINK_LAYER, SINK_DIM, SEQ = 32, 50_304, 11, 37, 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=256, tie_word_embeddings=True, rope_theta=500000.0)
    path = tmp_path_factory.mktemp("real-shape") / "llama-32l"
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def test_a_sink_in_a_real_shaped_bf16_checkpoint(checkpoint: Path) -> None:
    loaded = load(checkpoint)
    model = loaded.model
    assert loaded.backend == "native" and next(model.parameters()).dtype == torch.bfloat16
    c = model.config
    assert (c.num_layers, c.num_kv_heads, c.vocab_size, c.tie_embeddings) == (LAYERS, 2, VOCAB, True)

    def inject(_module, _args, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, 0, SINK_DIM] += 1000 * out.float().pow(2).mean().sqrt().to(out.dtype)
        return out

    model.layers[SINK_LAYER].hook_resid_post.register_forward_hook(inject)
    tokens = np.random.default_rng(0).integers(0, VOCAB, 2048 + 1).astype(np.int64)
    data = EvalData("random", tokens, "tokens", "random")
    verdicts = {}
    for n in (512, 2048):
        windows = n // SEQ
        config = ProfileConfig.of(batches=windows // 8, batch_size=8, seq_len=SEQ)
        frame = profile_model(model, data, config, run_id="m")
        d = diagnose(frame)
        verdicts[n] = d.verdict
        finding = d.summary["findings"]["massive_activations"]
        assert (finding["from_layer"], finding["dimension"], finding["position"]) == (SINK_LAYER, SINK_DIM, 0)
        assert finding["first_position_windows"] == 1.0
        assert d.summary["statistics_read"]["variance"] == "var_robust"
        assert d.summary["confidence"]["tokens"] == n and d.summary["decided_by"] == "deletion"
        var = (layer_rows(select(frame, site="resid_post", direction="fwd", stat=["var", "var_robust"]))
               .pivot_table(index="layer", columns="stat", values="value"))
        jump = var.loc[SINK_LAYER] / var.loc[SINK_LAYER - 1]
        assert jump["var"] > 100 and jump["var_robust"] < 2  # the sink makes var jump; without it, smooth
    confident = {v for v in verdicts.values() if v != "inconclusive"}
    assert len(confident) <= 1, verdicts

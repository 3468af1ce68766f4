"""Configurations and presets."""

from __future__ import annotations

import torch

from gpas_probe import ModelConfig, build_model


def test_71m_preset_has_the_papers_size():
    config = ModelConfig.from_preset("71m")
    with torch.device("meta"):
        model = build_model(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == config.num_parameters()
    assert 70e6 < n < 72e6

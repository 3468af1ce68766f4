"""Helpers shared by tests in several folders."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gpas_probe.intervals import t_quantile


def write_corpus(directory: Path, seed: int, words: int) -> Path:
    """A small deterministic text corpus (faster to load than the built-in one)."""
    rng = np.random.default_rng(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "residual", "stream", "layer", "norm", "gate", "scale"]
    path = directory / "corpus.txt"
    path.write_text(" ".join(rng.choice(vocab, size=words)))
    return path


def assert_figure_file(path: Path, kind: str, data: pd.DataFrame) -> None:
    """``path`` holds the ``kind`` figure of ``data`` as the library draws it: a PNG equal pixel for pixel
    to :func:`gpas_probe.plots.make_figure`'s, saved the same way; an SVG whose texts name every run and
    match the library's; a one-page PDF with the library's page size."""
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    from gpas_probe.plots import make_figure, save_figure

    fig = make_figure(kind, data)
    try:
        ref = save_figure(fig, path.with_name(f"reference-{path.name}"))
    finally:
        plt.close(fig)
    suffix = path.suffix.lower()
    if suffix == ".png":
        np.testing.assert_array_equal(mpimg.imread(path), mpimg.imread(ref))
    elif suffix == ".svg":
        texts = [re.findall(r"<!-- (.*?) -->", p.read_text()) for p in (path, ref)]
        assert texts[0] == texts[1] and texts[0]
        assert all(any(run in t for t in texts[0]) for run in data["run_id"].astype(str).unique())
    else:
        got, want = path.read_bytes(), ref.read_bytes()
        assert got.startswith(b"%PDF-") and got.rstrip().endswith(b"%%EOF")
        assert got.count(b"/Type /Page\n") + got.count(b"/Type /Page ") == 1
        assert re.findall(rb"/MediaBox \[[^\]]*\]", got) == re.findall(rb"/MediaBox \[[^\]]*\]", want)


def ratio_bounds(x: list[float], y: list[float]) -> tuple[float, float]:
    """The 95% interval of sum(x) / sum(y) over sequences (one x and y each), residual by residual: the
    brute-force twin of the streamed intervals."""
    m, r = len(x), sum(x) / sum(y)
    se = math.sqrt(m / (m - 1) * sum((a - r * b) ** 2 for a, b in zip(x, y, strict=True))) / sum(y)
    q = t_quantile(0.975, m - 1)
    return r - q * se, r + q * se


def hooks_on(model: torch.nn.Module) -> int:
    """How many hooks sit on a model's modules and parameters."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
    for p in model.parameters():
        n += len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {})
    return n


def count_hook_calls(monkeypatch, current: dict[str, int]) -> Counter[int]:
    """From now on, every hook registered on a module or a tensor counts its calls by ``current["step"]``
    (whoever registered it): step -> calls."""
    calls: Counter[int] = Counter()

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls[current["step"]] += 1
            return fn(*args, **kwargs)
        return wrapper

    def counting(register):
        def patched(self, hook, *args, **kwargs):
            return register(self, counted(hook), *args, **kwargs)
        return patched

    for cls, name in ((torch.nn.Module, "register_forward_hook"), (torch.nn.Module, "register_forward_pre_hook"),
                      (torch.nn.Module, "register_full_backward_hook"), (torch.Tensor, "register_hook"),
                      (torch.Tensor, "register_post_accumulate_grad_hook")):
        monkeypatch.setattr(cls, name, counting(getattr(cls, name)))
    return calls


def built_models(monkeypatch) -> list[torch.nn.Module]:
    """The models :func:`gpas_probe.training.train` builds from now on, in order."""
    import gpas_probe.training as train_mod

    models: list[torch.nn.Module] = []
    real_build = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda cfg: models.append(real_build(cfg)) or models[-1])
    return models

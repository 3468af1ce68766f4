"""A recorded step's rows as a compact summary: a few per-layer series and the model's scalars, named so
that TensorBoard, W&B and MLflow group and sort them: ``gpas/var/resid_post/layer_07``,
``gpas/model/loss``."""

from __future__ import annotations

from gpas_probe.store.schema import MODEL_LAYER, MODEL_SITE

#: (site, direction, stat) of a per-layer row -> the metric it is logged as, ``PREFIX/METRIC/layer_LL``.
PER_LAYER: dict[tuple[str, str, str], str] = {
    ("resid_post", "fwd", "var"): "var/resid_post",  # forward variance of the residual stream a layer leaves
    ("attn", "fwd", "shortcut_branch_ratio"): "ratio/attn",
    ("mlp", "fwd", "shortcut_branch_ratio"): "ratio/mlp",
    ("params", "none", "grad_norm"): "grad_norm",  # the layer's parameters, before clipping
    ("gpas", "none", "scale"): "gate_scale",  # 1 - SiLU(alpha); per sub-layer gates: gate_scale/attn, /mlp
    ("gpas_attn", "none", "scale"): "gate_scale/attn",
    ("gpas_mlp", "none", "scale"): "gate_scale/mlp",
}
#: Model-level stats (layer -1) logged as ``PREFIX/model/STAT``.
MODEL_STATS = ("loss", "val_loss", "lr", "grad_norm")


def layer_digits(depth: int) -> int:
    """Digits of the layer numbers in names, so that they sort: 2 up to 100 layers, then as many as needed."""
    return max(2, len(str(max(depth - 1, 0))))


def layer_name(prefix: str, metric: str, layer: int, digits: int) -> str:
    """``gpas/var/resid_post/layer_07``."""
    return f"{prefix}/{metric}/layer_{layer:0{digits}d}"


class Summary:
    """Names the rows of a recorded step that the loggers get: :meth:`name` is the metric a row is logged
    as, or None for the rows left to the parquet table. Names are built once per row key."""

    def __init__(self, depth: int, prefix: str = "gpas") -> None:
        self.depth, self.prefix, self.digits = depth, prefix, layer_digits(depth)
        self._names: dict[tuple[int, str, str, str], str | None] = {}

    def name(self, layer: int, site: str, direction: str, stat: str) -> str | None:
        key = (layer, site, direction, stat)
        try:
            return self._names[key]
        except KeyError:
            pass
        if layer == MODEL_LAYER:
            name = f"{self.prefix}/model/{stat}" if site == MODEL_SITE and stat in MODEL_STATS else None
        else:
            metric = PER_LAYER.get((site, direction, stat))
            name = layer_name(self.prefix, metric, layer, self.digits) if metric is not None else None
        self._names[key] = name
        return name

    def per_layer_metrics(self) -> list[str]:
        """``PREFIX/METRIC`` of every per-layer series (without the layer part)."""
        return [f"{self.prefix}/{m}" for m in PER_LAYER.values()]

    def model_metrics(self) -> list[str]:
        return [f"{self.prefix}/model/{s}" for s in MODEL_STATS]

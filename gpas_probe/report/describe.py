"""What a report says about each run or profile: its kind, the model and its preset, the training or
profiling settings, what was recorded and the versions, from the probe metadata and the rows read."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from gpas_probe.config import PRESETS, ModelConfig
from gpas_probe.folders import run_state
from gpas_probe.store.reader import extent

log = logging.getLogger(__name__)

TRAINING, PROFILE = "training run", "profile"
#: Metadata keys of versions, with how the report names them.
VERSIONS = (("gpas_probe_version", "gpas-probe"), ("torch_version", "torch"), ("pyarrow_version", "pyarrow"),
            ("python_version", "Python"), ("schema_version", "probe schema"))


def run_kind(meta: Mapping[str, Any]) -> str:
    """``'profile'`` for the rows ``gpas-probe profile`` wrote, else ``'training run'``."""
    return PROFILE if meta.get("kind") == "profile" else TRAINING


def preset_of(model: Mapping[str, Any]) -> str | None:
    """The preset whose model settings the configuration has (every one of them), or None."""
    for name, preset in PRESETS.items():
        if preset.model and all(model.get(k) == v for k, v in preset.model.items()):
            return name
    return None


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.3g}B)" if n >= 1e9 else f"{n:,} ({n / 1e6:.3g}M)"


#: Our configuration's size fields and their names in Hugging Face configurations (a profile of another model).
SIZE_KEYS = {"num_layers": ("num_hidden_layers", "n_layer"), "hidden_size": ("n_embd",),
             "intermediate_size": ("n_inner",), "num_heads": ("num_attention_heads", "n_head"),
             "num_kv_heads": ("num_key_value_heads",), "vocab_size": (), "max_seq_len": ("max_position_embeddings",)}


def _size(model: Mapping[str, Any], key: str) -> object:
    return next((model[k] for k in (key, *SIZE_KEYS[key]) if model.get(k) is not None), None)


def model_facts(model: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Scheme, preset, shape and parameter count of a model configuration (what of it is there)."""
    if not model:
        return [("model", "not recorded")]
    facts = []
    norm = model.get("norm")
    if norm is not None:
        gpas = ""
        if model.get("gpas"):
            mode = "naive scaling (no stop-gradient)" if model.get("gpas_mode") == "naive" else "GPAS"
            gpas = f" + {mode}, one gate per {model.get('gpas_granularity', 'layer')}"
        mixed = norm == "mixln" and model.get("post_layers") is not None
        post = f", {model['post_layers']} post layers" if mixed else ""
        facts.append(("scheme", f"{norm}{gpas}{post}"))
    elif model.get("model_type"):
        facts.append(("architecture", str(model["model_type"])))
    preset = preset_of(model)
    facts.append(("preset", f"{preset} (its model settings)" if preset else "none matches: custom sizes"))
    shape = [f"{_size(model, 'num_layers') or '?'} layers × {_size(model, 'hidden_size') or '?'} wide"]
    for key, name in (("intermediate_size", "ffn"), ("num_heads", "heads"), ("num_kv_heads", "kv heads"),
                      ("vocab_size", "vocabulary"), ("max_seq_len", "max sequence")):
        if _size(model, key) is not None:
            shape.append(f"{name} {_size(model, key)}")
    facts.append(("model", ", ".join(shape)))
    try:
        facts.append(("parameters", _count(ModelConfig.from_dict(dict(model)).num_parameters())))
    except (TypeError, ValueError, AssertionError) as e:  # a configuration of another library
        log.info("no parameter count for this model configuration: %s", e)
    return facts


def training_facts(train: Mapping[str, Any], probes: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """Steps, optimisation, batch, data and probe schedule of a training run."""
    if not train:
        return [("training", "not recorded")]
    facts = [("steps", str(train.get("steps")))]
    opt = [f"lr {train.get('lr')} (warmup {train.get('warmup')}, down to {train.get('min_lr_ratio')}× peak)",
           f"weight decay {train.get('weight_decay')}", f"gradient clip {train.get('grad_clip')}"]
    if train.get("gate_clip"):
        opt.append(f"gate gradient clip {train['gate_clip']}")
    facts.append(("optimiser", ", ".join(opt)))
    facts.append(("batch", f"{train.get('batch_size')} × {train.get('seq_len')} tokens, seed {train.get('seed')}"))
    facts.append(("data", str(train.get("data"))))
    if probes:
        every = f"every {probes.get('every')} steps" + (f" ({probes['schedule']} schedule)"
                                                        if probes.get("schedule") not in (None, "every") else "")
        facts.append(("probes", f"{every}; {', '.join(map(str, probes.get('stats') or []))}"))
    return facts


def checkpoint_source(path: Path) -> Path:
    """The run (or folder) a profiled checkpoint comes from: ``RUN`` for ``RUN/checkpoints/step_N``, the folder
    of ``step_N`` checkpoints, or the checkpoint itself."""
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return path.parent if path.name.startswith("step_") else path


def profile_facts(profile: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The checkpoints profiled, the evaluation data and what was measured."""
    facts = []
    checkpoints = profile.get("checkpoints") or []
    steps = []
    for c in checkpoints:
        step = ((c.get("config") or {}).get("gpas_probe") or {}).get("step") if isinstance(c, dict) else None
        if step is not None:
            steps.append(str(step))
    if checkpoints:
        first = checkpoints[0].get("path") if isinstance(checkpoints[0], dict) else None
        where = f" of {checkpoint_source(Path(str(first)))}" if first else ""
        facts.append(("checkpoints", f"{len(checkpoints)}" + (f" (steps {', '.join(steps)})" if steps else "")
                      + where))
    data = profile.get("data") or {}
    if data:
        facts.append(("evaluation data", f"{data.get('name', data.get('source'))} ({data.get('kind')}), "
                      f"{data.get('batches')} batch(es) of {data.get('batch_size')} × {data.get('seq_len')} tokens"))
    measured = [name for name in ("importance", "activations") if profile.get(name)]
    facts.append(("measured", (", ".join(f"{m} ({profile[m]})" if isinstance(profile[m], str) else m
                                         for m in measured) or "nothing")
                  + f"; backend {profile.get('backend')}, device {profile.get('device')}"))
    return facts


def recorded_facts(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """What the rows hold: steps, layers, sites and rows, as ``gpas-probe info`` counts them."""
    held = extent(frame)
    return [("recorded steps", f"{len(held.probed)} with per-layer rows, {len(held.steps)} with rows"
             + (f", {held.steps[0]}..{held.steps[-1]}" if held.steps else "")),
            ("recorded layers", str(len(held.layers))),
            ("sites", ", ".join(held.sites)),
            ("rows", f"{len(frame):,}")]


def run_facts(folder: Path, label: str, meta: Mapping[str, Any], frame: pd.DataFrame) -> list[tuple[str, str]]:
    """Every fact the report lists for one run, in order."""
    kind = run_kind(meta)
    facts = [("run", label)]
    if meta.get("run_id") not in (None, label):
        facts.append(("stored run id", str(meta["run_id"])))
    facts += [("folder", str(folder)), ("kind", kind)]
    if kind == TRAINING:
        try:
            facts.append(("status", run_state(folder)))
        except (OSError, ValueError) as e:
            facts.append(("status", f"unknown ({e})"))
    facts += model_facts(meta.get("model_config") or {})
    if kind == TRAINING:
        facts += training_facts(meta.get("train_config") or {}, meta.get("probe_config"))
        if meta.get("world_size", 1) != 1:
            facts.append(("processes", str(meta["world_size"])))
    else:
        facts += profile_facts(meta.get("profile") or {})
    facts += recorded_facts(frame)
    versions = [f"{name} {meta[key]}" for key, name in VERSIONS if meta.get(key) is not None]
    facts.append(("versions", ", ".join(versions) or "not recorded"))
    if meta.get("git_revision"):
        facts.append(("git revision", str(meta["git_revision"])))
    if meta.get("created"):
        facts.append(("created", str(meta["created"])))
    return facts

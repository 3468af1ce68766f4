"""Profiles of trained checkpoints: forward/backward statistics at every site and layer importance.

A profile evaluates a checkpoint on evaluation batches (:mod:`gpas_probe.evaldata`) and records, in
the training schema of :mod:`gpas_probe.store`, one "step" per checkpoint, whose ``step`` is the
checkpoint's training step (its ``step_N``/``checkpoint-N`` folder name when the checkpoint does not
record it; 0 when neither tells):

- every probe family of :mod:`gpas_probe.probes` pooled over all batches as one recorded step:
  ``fwd``/``bwd`` ``var``, ``rms``, ``absmax`` at every residual site, shortcut/branch ratios, per
  layer ``grad_norm`` and ``weight_norm`` (no ``update_ratio``: nothing is updated), the GPAS gates
  with ``alpha_grad``, and the model's global ``grad_norm``. Padding is excluded from every
  statistic. Gradients are those of the token-mean loss over all target tokens of all batches,
  as if the batches were one: each batch backpropagates its summed cross-entropy divided by the
  total target count (known before the first batch), so ``bwd`` statistics and gradient norms do
  not depend on how the tokens are split into batches;
- layer importance (:mod:`gpas_probe.analysis.importance`, rows of its ``to_long``): the loss
  increase when each decoder layer is deleted (``site='importance'``, ``deletion_delta`` and
  ``deletion_loss``), block influence (``block_influence``) and the angular distances
  (``site='angular_n{n}'``, ``angular_distance`` and the per-row normalized ``angular_distance_norm``);
- the validation loss, ``layer=-1, site='model', stat='val_loss'`` (the token-mean loss over the
  batches).

Batches are streamed twice per checkpoint (once for the statistics, once for importance), one at a
time, so memory does not grow with the number of batches.

Checkpoints of architectures the native loader does not read (anything but our own, the GPAS code's,
LLaMA, Mistral and Qwen2) are loaded with ``transformers`` when it is installed (the ``hf`` extra;
``backend="hf"`` forces it, ``"native"`` refuses it) and profiled at the sites their layers expose
(:mod:`gpas_probe.hf`): every layer's ``resid_pre``/``resid_post``, all sites for layers of a known
structure. Importance is computed from the same definitions, deleting a layer by replacing its output
with its input (one forward pass per layer and batch).

Output layout (``out`` holds one run folder per run)::

    OUT/RUN_ID/profile.json             what was profiled: per checkpoint its path, step, config.json,
                                        tokenizer, validation loss and seconds; the data and options
    OUT/RUN_ID/probes/_meta.json        store metadata (the same options, the model config, versions)
    OUT/RUN_ID/probes/part-*.parquet    the rows, one step per checkpoint

Checkpoints of one training run share a run folder, so the steps of that folder show importance over
training: a run folder (``checkpoints/step_*``) or a folder of ``step_*`` checkpoints gives all its
steps (only the latest with ``latest=True``), and step checkpoints given one by one join their run's
folder. ``RUN_ID`` is the run folder's name (a lone checkpoint's own folder name), or ``run_id=``
for everything given. A run folder is written under a temporary name and renamed into place when
complete; an existing one is replaced only with ``overwrite=True``, and only if it is a profile.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gpas_probe.analysis.importance import layer_importance, to_long
from gpas_probe.checkpoint import (
    CONFIG_NAME,
    find_checkpoints,
    load_checkpoint,
    publish_dir,
    read_config,
    resolve_checkpoint,
)
from gpas_probe.evaldata import TOKENIZER_FILE, EvalData, load_eval_data
from gpas_probe.foreign import architecture, checkpoint_step
from gpas_probe.model import IGNORE_INDEX, Transformer
from gpas_probe.probes import Probe, ProbeConfig
from gpas_probe.store import COLUMNS, PROBES_DIR, ProbeWriter

log = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
#: The probe families a profile records (all of them).
PROFILE_FAMILIES = ("activations", "ratios", "params", "gpas", "model")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
_STEP_NAME = re.compile(r"(?:step|checkpoint)[_-](\d+)$")
BACKENDS = ("auto", "native", "hf")
_SCHEMA = {"run_id": str, "step": "int64", "layer": "int16", "site": str, "direction": str, "stat": str,
           "value": "float64"}


@dataclass
class ProfileProgress:
    """Reported after every evaluation batch: ``completed`` of ``total`` batch passes of the whole call."""

    run_id: str
    checkpoint: Path
    step: int
    phase: str  # "activations" or "importance"
    completed: int
    total: int


# ------------------------------------------------------------------------------------ one model


def _counted(batches: Iterable[Any], on_batch: Callable[[], None] | None) -> Iterator[Any]:
    for batch in batches:
        yield batch
        if on_batch is not None:
            on_batch()  # the consumer asked for the next batch: this one is done


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, Transformer):
        return model(input_ids).logits
    from gpas_probe.hf import logits

    return logits(model, input_ids)


def _probe_frame(model: nn.Module, data: EvalData, step: int, run_id: str, sizes: tuple[int, int, int],
                 val_loss_row: bool, on_batch: Callable[[], None] | None) -> pd.DataFrame:
    """One probe step pooled over every batch; gradients of the token-mean loss over all of them."""
    n_targets = data.num_targets(*sizes)
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    config = ProbeConfig(every=1, stats=PROFILE_FAMILIES)
    try:
        with torch.enable_grad(), Probe(model, config=config, schedule=lambda s: True, run_id=run_id) as probe:
            probe.begin_step(step)
            for input_ids, labels, mask in _counted(data.batches(*sizes), on_batch):
                input_ids, labels, mask = input_ids.to(device), labels.to(device), mask.to(device)
                probe.set_exclude_mask(~mask)
                logits = _logits(model, input_ids)
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum")
                (loss / n_targets).backward()
                loss_sum += loss.detach().double()
                del logits, loss
            val_loss = float(loss_sum) / n_targets
            probe.end_step(SimpleNamespace(step=step, val_loss=val_loss if val_loss_row else None))
            frame = probe.frame()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return frame[frame["stat"] != "update_ratio"]


def _max_len(model: nn.Module) -> int | None:
    config = model.config
    return config.max_seq_len if isinstance(model, Transformer) else getattr(config, "max_position_embeddings", None)


def profile_model(model: nn.Module, data: EvalData, *, step: int = 0, run_id: str = "profile",
                  batches: int = 8, batch_size: int = 8, seq_len: int = 256, importance: bool = True,
                  activations: bool = True, on_batch: Callable[[str], None] | None = None) -> pd.DataFrame:
    """The profile rows of one model (module doc) as a frame of the store's columns, all at ``step``.

    ``model`` is ours or a Hugging Face causal LM (instrumented for the call, :mod:`gpas_probe.hf`).
    ``data`` must fit the model (:meth:`EvalData.check_vocab`); ``on_batch(phase)`` is called after
    each batch of each pass (``"activations"``, then ``"importance"``)."""
    if not (importance or activations):
        raise ValueError("nothing to profile: both activations and importance are off")
    data.check_vocab(model.config.vocab_size)
    max_len = _max_len(model)
    if max_len is not None and seq_len > max_len:
        log.warning("seq_len %d exceeds the model's max_position_embeddings %d", seq_len, max_len)
    if isinstance(model, Transformer):
        return _profile_frames(model, data, step, run_id, (batch_size, seq_len, batches), importance, activations,
                               on_batch)
    from gpas_probe.hf import instrument, is_instrumented, uninstrument

    was_instrumented = is_instrumented(model)
    instrument(model)
    try:
        return _profile_frames(model, data, step, run_id, (batch_size, seq_len, batches), importance, activations,
                               on_batch)
    finally:
        if not was_instrumented:
            uninstrument(model)


def _profile_frames(model: nn.Module, data: EvalData, step: int, run_id: str, sizes: tuple[int, int, int],
                    importance: bool, activations: bool, on_batch: Callable[[str], None] | None) -> pd.DataFrame:
    frames = []
    if activations:
        done = (lambda: on_batch("activations")) if on_batch else None
        frames.append(_probe_frame(model, data, step, run_id, sizes, not importance, done))
    if importance:
        done = (lambda: on_batch("importance")) if on_batch else None
        if isinstance(model, Transformer):
            result = layer_importance(model, _counted(data.batches(*sizes), done), normalize_rows=True)
        else:
            from gpas_probe.hf import layer_importance as hf_layer_importance

            result = hf_layer_importance(model, _counted(data.batches(*sizes), done), normalize_rows=True)
        frames += [to_long(result[k], run_id, step) for k in ("deletion", "block_influence", "angular")]
    out = pd.concat(frames, ignore_index=True)[list(COLUMNS)]
    return out.astype(_SCHEMA).reset_index(drop=True)


# ---------------------------------------------------------------------------------- checkpoints


def _step_from_name(path: Path) -> int | None:
    m = _STEP_NAME.search(path.name)
    return int(m.group(1)) if m else None


def _run_folder(ckpt: Path) -> Path:
    """The folder whose profile a checkpoint joins: its run for step checkpoints, else itself."""
    if _step_from_name(ckpt) is None:
        return ckpt
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _step_dirs(folder: Path) -> list[Path]:
    found = find_checkpoints(folder)
    if not found:
        found = [d for d in folder.iterdir()
                 if d.is_dir() and _step_from_name(d) is not None and (d / CONFIG_NAME).is_file()]
    return sorted(found, key=lambda d: _step_from_name(d) or 0)


def checkpoint_groups(paths: Sequence[str | Path], *, run_id: str | None = None,
                      latest: bool = False) -> dict[str, list[Path]]:
    """``run_id -> checkpoint folders`` (oldest first) for what was given (module doc). Nothing is loaded."""
    if not paths:
        raise ValueError("no checkpoints given")
    groups: dict[str, list[Path]] = {}
    where: dict[str, Path] = {}
    for given in paths:
        p = Path(given)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint not found: {p}")
        if (p / CONFIG_NAME).is_file():
            ckpts, run = [p], _run_folder(p.resolve())
        else:
            ckpts, run = (_step_dirs(p) if p.is_dir() else []), p.resolve()
            if not ckpts:
                resolve_checkpoint(p)  # raises its one-line error
            if latest:
                ckpts = ckpts[-1:]
        name = run_id or run.name
        if run_id is None and where.setdefault(name, run) != run:
            raise ValueError(f"{where[name]} and {run} would both be profiled as run {name!r}; profile them "
                             f"separately, each with its own --run-id")
        group = groups.setdefault(name, [])
        group.extend(c for c in (c.resolve() for c in ckpts) if c not in group)
    for group in groups.values():
        group.sort(key=lambda c: (_step_from_name(c) is None, _step_from_name(c) or 0))
    return groups


def _check_run_id(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"invalid run id {name!r}: it names a folder under the output folder")


def _check_destination(dest: Path, overwrite: bool) -> None:
    if not dest.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{dest} already exists; pass --overwrite to replace it")
    if not (dest / PROFILE_FILE).is_file():
        raise FileExistsError(f"{dest} exists and is not a profile folder (no {PROFILE_FILE}); refusing to replace it")


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16")
    return DTYPES[str(dtype)]


def _device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but no CUDA device is available")
    return d


class _Data:
    """Evaluation data per tokenizer, loaded once for all checkpoints that share it."""

    def __init__(self, source: str | Path, tokenizer: Any) -> None:
        self.source, self.tokenizer = source, tokenizer
        self.text = str(source) == "builtin" or Path(source).suffix not in (".npy", ".bin")
        self._cache: dict[Any, EvalData] = {}

    def tokenizer_for(self, ckpt: Path) -> Any:
        """The tokenizer given, else the checkpoint's own ``tokenizer.json`` for text data."""
        if self.tokenizer is not None:
            return self.tokenizer
        own = ckpt / TOKENIZER_FILE
        return own if self.text and own.is_file() else None

    def get(self, ckpt: Path) -> EvalData:
        tok = self.tokenizer_for(ckpt)
        key = None if tok is None else "given" if tok is self.tokenizer else tok.read_bytes()
        if key not in self._cache:
            self._cache[key] = load_eval_data(self.source, tokenizer=tok)
        return self._cache[key]


def profile_many(paths: Sequence[str | Path], out: str | Path, *, data: str | Path = "builtin",
                 tokenizer: Any = None, batches: int = 8, batch_size: int = 8, seq_len: int = 256,
                 norm: str | None = None, post_layers: int | None = None, device: str | torch.device = "auto",
                 dtype: torch.dtype | str | None = None, run_id: str | None = None, importance: bool = True,
                 activations: bool = True, latest: bool = False, overwrite: bool = False, backend: str = "auto",
                 callback: Callable[[ProfileProgress], None] | None = None) -> list[Path]:
    """Profile checkpoints, run folders or folders of ``step_*`` checkpoints into ``out`` (module doc).

    ``data``/``tokenizer``/``batches``/``batch_size``/``seq_len`` choose the evaluation batches
    (:mod:`gpas_probe.evaldata`; a checkpoint's own ``tokenizer.json`` is used for text data when no
    tokenizer is given); ``norm``, ``post_layers``, ``dtype`` and ``device`` go to
    :func:`gpas_probe.checkpoint.load_checkpoint`. ``backend``: ``"auto"`` loads natively what the
    native loader reads and other architectures with transformers, ``"native"`` or ``"hf"``
    (:func:`gpas_probe.hf.load_hf_causal_lm`) always. Returns the run folders written."""
    if not (importance or activations):
        raise ValueError("nothing to profile: both activations and importance are off")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    groups = checkpoint_groups(paths, run_id=run_id, latest=latest)
    out = Path(out)
    for name in groups:
        _check_run_id(name)
        _check_destination(out / name, overwrite)
    torch_dtype, dev = _dtype(dtype), _device(device)
    source = _Data(data, tokenizer)
    first = next(iter(groups.values()))[0]
    per_ckpt = source.get(first).num_batches(batch_size, seq_len, batches) * (activations + importance)
    counter = {"done": 0, "total": per_ckpt * sum(len(g) for g in groups.values())}
    options = {"data": {**source.get(first).spec(), "batches": batches, "batch_size": batch_size, "seq_len": seq_len},
               "norm": norm, "post_layers": post_layers, "dtype": str(torch_dtype) if torch_dtype else None,
               "device": str(dev), "importance": importance, "activations": activations, "backend": backend,
               "gradients": "of the token-mean loss over all target tokens of all batches"}
    written = []
    for name, ckpts in groups.items():
        written.append(_profile_run(name, ckpts, out, source, options, counter, callback,
                                    dict(norm=norm, post_layers=post_layers, dtype=torch_dtype, device=dev)))
    return written


def _uses_hf(cfg: dict[str, Any], backend: str) -> bool:
    """Whether a checkpoint with this ``config.json`` loads with transformers (module doc)."""
    if backend != "auto":
        return backend == "hf"
    if cfg.get("gpas_probe") or architecture(cfg) is not None:
        return False
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False  # the native loader's error names the extra
    return True


def _load(ckpt: Path, backend: str, load_kw: dict[str, Any]) -> tuple[nn.Module, int | None]:
    """``(model, training step or None)`` of one checkpoint."""
    cfg = read_config(ckpt)
    if not _uses_hf(cfg, backend):
        model = load_checkpoint(ckpt, **load_kw)
        return model, model.step
    from gpas_probe.hf import load_hf_causal_lm

    given = [k for k in ("norm", "post_layers") if load_kw.get(k) is not None]
    if given:
        raise ValueError(f"{ckpt}: {', '.join(given)} applies only to checkpoints loaded natively, "
                         f"not with transformers")
    name = (cfg.get("architectures") or [cfg.get("model_type")])[0]
    try:
        model = load_hf_causal_lm(ckpt, dtype=load_kw.get("dtype"), device=load_kw.get("device"))
    except ValueError as e:
        if backend == "hf":
            raise
        reason = str(e).removeprefix(f"{ckpt}: ")
        raise ValueError(f"{ckpt}: architecture {name!r} is not supported natively, and {reason}") from None
    return model, checkpoint_step(ckpt, cfg)


def _profile_run(name: str, ckpts: list[Path], out: Path, source: _Data, options: dict[str, Any],
                 counter: dict[str, int], callback: Callable[[ProfileProgress], None] | None,
                 load_kw: dict[str, Any]) -> Path:
    dest = out / name
    sizes = {k: options["data"][k] for k in ("batches", "batch_size", "seq_len")}
    tmp = out / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"  # made with the first rows
    writer: ProbeWriter | None = None
    record: list[dict[str, Any]] = []
    try:
        for ckpt in ckpts:
            t0 = time.perf_counter()
            model, known_step = _load(ckpt, options["backend"], load_kw)
            step = known_step if known_step is not None else (_step_from_name(ckpt) or 0)
            if any(r["step"] == step for r in record):
                raise ValueError(f"{ckpt}: step {step} was already profiled in run {name!r} "
                                 f"(from {next(r['path'] for r in record if r['step'] == step)})")
            data = source.get(ckpt)
            data.check_vocab(model.config.vocab_size)
            log.info("profiling %s (step %d) on %s", ckpt, step, data.name)

            def on_batch(phase: str, ckpt: Path = ckpt, step: int = step) -> None:
                counter["done"] += 1
                if callback is not None:
                    callback(ProfileProgress(name, ckpt, step, phase, counter["done"], counter["total"]))

            frame = profile_model(model, data, step=step, run_id=name, importance=options["importance"],
                                  activations=options["activations"], on_batch=on_batch, **sizes)
            if writer is None:
                out.mkdir(parents=True, exist_ok=True)
                tmp.mkdir()  # the usual mode (mkdtemp's would be private)
                checkpoints = [{"path": str(c), "config": read_config(c)} for c in ckpts]
                meta = {"kind": "profile", "profile": {**options, "checkpoints": checkpoints},
                        "model_config": model.config.to_dict()}
                writer = ProbeWriter(tmp / PROBES_DIR, name, meta)
            for row in frame.itertuples(index=False):
                writer.add(row.step, row.layer, row.site, row.direction, row.stat, row.value)
            writer.end_step()
            val = frame.loc[(frame["stat"] == "val_loss") & (frame["layer"] == -1), "value"]
            record.append({"path": str(ckpt), "step": step, "config": read_config(ckpt), "tokenizer": data.tokenizer,
                           "val_loss": float(val.iloc[0]) if len(val) else math.nan,
                           "target_tokens": data.num_targets(sizes["batch_size"], sizes["seq_len"], sizes["batches"]),
                           "seconds": round(time.perf_counter() - t0, 3)})
            del model
        assert writer is not None
        writer.close()
        summary = {"run_id": name, **options, "checkpoints": record}
        (tmp / PROFILE_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        publish_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote profile %s (%d checkpoints)", dest, len(record))
    return dest


def profile_checkpoint(path: str | Path, out: str | Path, **kwargs: Any) -> Path:
    """Profile one checkpoint (a run folder means its latest) into ``out/RUN_ID``; returns that folder.

    Takes the keyword arguments of :func:`profile_many`."""
    p = Path(path)
    if p.exists() and not (p / CONFIG_NAME).is_file():
        found = _step_dirs(p) if p.is_dir() else []
        p = found[-1] if found else resolve_checkpoint(p)
    return profile_many([p], out, **kwargs)[0]

"""Profiling checkpoints into run folders: load each, profile it, write the rows and a ``profile.json``."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpas_probe.atomic import publish_dir, temporary_dir
from gpas_probe.checkpoints import (
    CONFIG_NAME,
    load,
    own_tokenizer,
    read_config,
    resolve_checkpoint,
    step_checkpoints,
    step_from_name,
)
from gpas_probe.devices import resolve_device, resolve_dtype
from gpas_probe.evaldata import EvalData, load_eval_data
from gpas_probe.lock import RunLock
from gpas_probe.profile.config import EvalSpec, ProfileConfig
from gpas_probe.profile.groups import (
    PROFILE_FILE,
    check_destination,
    check_run_id,
    checkpoint_groups,
    trained_seq_len,
)
from gpas_probe.profile.measure import profile_model
from gpas_probe.profile.streamed import open_streamed, profile_streamed
from gpas_probe.progress import PhaseReport
from gpas_probe.store import PROBES_DIR, ProbeWriter
from gpas_probe.store.schema import MODEL_LAYER
from gpas_probe.threads import use_threads

log = logging.getLogger(__name__)


@dataclass
class ProfileProgress:
    """What a profile is doing: ``phase`` ``"data"`` (reading and tokenizing the evaluation data),
    ``"loading"`` (a checkpoint) or ``"profile"`` (reported after every evaluation batch); ``completed``
    of ``total`` batches of the whole call (``total`` 0 until the data is read)."""

    run_id: str
    checkpoint: Path
    step: int | None
    phase: str
    completed: int
    total: int

    def describe(self) -> str:
        if self.phase == "data":
            return "reading the evaluation data"
        if self.phase == "loading":
            return f"loading {self.checkpoint}"
        return f"{self.run_id} step {self.step}" + ("" if self.phase == "profile" else f", {self.phase}")


class _Data:
    """Evaluation data per tokenizer, loaded once for all checkpoints that share it."""

    def __init__(self, spec: EvalSpec) -> None:
        self.source, self.tokenizer = spec.data, spec.tokenizer
        self.text = str(self.source) == "builtin" or Path(self.source).suffix not in (".npy", ".bin")
        self._cache: dict[Any, EvalData] = {}

    def tokenizer_for(self, ckpt: Path) -> Any:
        """The tokenizer given, else the checkpoint's own ``tokenizer.json`` (a GGUF file's) for text data."""
        if self.tokenizer is not None:
            return self.tokenizer
        return own_tokenizer(ckpt) if self.text else None

    def get(self, ckpt: Path) -> EvalData:
        tok = self.tokenizer_for(ckpt)
        key = None if tok is None else "given" if tok is self.tokenizer else tok.read_bytes()
        if key not in self._cache:
            self._cache[key] = load_eval_data(self.source, tokenizer=tok)
        return self._cache[key]


def profile_many(paths: Sequence[str | Path], out: str | Path, config: ProfileConfig | None = None, *,
                 run_id: str | None = None, latest: bool = False, overwrite: bool = False,
                 callback: Callable[[ProfileProgress], None] | None = None, progress: str = "auto") -> list[Path]:
    """Profile checkpoints, run folders or folders of step checkpoints into ``out`` (:mod:`gpas_probe.profile`).

    ``config`` (:class:`ProfileConfig`; ``ProfileConfig.of(**options)`` from flat options) chooses the
    evaluation batches, how checkpoints load and what is measured; a checkpoint's own
    ``tokenizer.json`` is used for text data when no tokenizer is given. ``callback`` hears every
    :class:`ProfileProgress`; ``progress`` (:data:`gpas_probe.progress.MODES`) shows it from the first
    second: a bar in a terminal or a notebook, else a line every 10 s through the ``gpas_probe.progress``
    logger. Returns the run folders written."""
    config = config or ProfileConfig()
    groups = checkpoint_groups(paths, run_id=run_id, latest=latest)
    out = Path(out)
    for name in groups:
        check_run_id(name)
    with ExitStack() as locks:
        for name in groups:  # one writer per profile folder, for the whole call
            lock = locks.enter_context(RunLock(out / name, "profile", lock_file=out / f".{name}.gpas-probe.lock"))
            check_destination(out / name, overwrite)
            lock.announce()
        report = PhaseReport("profile", mode=progress, unit="layer pass" if config.loading.stream else "batch")
        locks.callback(report.close)

        def tell(p: ProfileProgress) -> None:
            report.update(p.describe(), p.completed, p.total)
            if callback is not None:
                callback(p)

        written = _profile_groups(groups, out, config, tell)
        report.finish(f"{len(written)} run(s) into {out}")
        return written


def _profile_groups(groups: dict[str, list[Path]], out: Path, config: ProfileConfig,
                    callback: Callable[[ProfileProgress], None]) -> list[Path]:
    loading = config.loading
    dtype, device = resolve_dtype(loading.dtype), resolve_device(loading.device)
    source = _Data(config.evaluation)
    name, first = next((name, ckpts[0]) for name, ckpts in groups.items())
    threads = use_threads(loading.threads, device=device)

    def tell(p: ProfileProgress) -> None:
        threads.check()  # the free cores, followed at batch boundaries
        callback(p)

    tell(ProfileProgress(name, first, None, "data", 0, 0))
    first_config = read_config(first)
    max_len = first_config.get("max_position_embeddings")
    config, why = config.with_seq_len(trained_seq_len(first), max_len if isinstance(max_len, int) else None)
    ev, measure = config.evaluation, config.measure
    per_ckpt = source.get(first).num_batches(*ev.sizes)  # one pass over the batches
    if loading.stream:  # a sweep through the layers (two with a backward), and the head
        backward = measure.activations or measure.estimate
        per_ckpt = int(first_config.get("num_hidden_layers") or 0) * (2 if backward else 1) + 1
    counter = {"done": 0, "total": per_ckpt * sum(len(g) for g in groups.values())}
    options = {"data": {**source.get(first).spec(), "batches": ev.batches, "batch_size": ev.batch_size,
                        "seq_len": ev.seq_len, "seq_len_from": why},
               "norm": loading.norm, "post_layers": loading.post_layers, "dtype": str(dtype) if dtype else None,
               "device": str(device), "importance": measure.importance, "deletion": measure.deletion,
               "activations": measure.activations,
               "skip_first_position": measure.skip_first_position, "outlier_factor": measure.outlier_factor,
               "backend": loading.backend, "stream": loading.stream,
               "gradients": "of the token-mean loss over all target tokens of all batches"}
    load_kw = dict(backend=loading.backend, norm=loading.norm, post_layers=loading.post_layers, dtype=dtype,
                   device=device)
    return [_profile_run(name, ckpts, out, source, config, options, counter, tell, load_kw)
            for name, ckpts in groups.items()]


def _profile_run(name: str, ckpts: list[Path], out: Path, source: _Data, config: ProfileConfig,
                 options: dict[str, Any], counter: dict[str, int], callback: Callable[[ProfileProgress], None],
                 load_kw: dict[str, Any]) -> Path:
    dest = out / name
    tmp: Path | None = None  # made with the first rows
    writer: ProbeWriter | None = None
    record: list[dict[str, Any]] = []
    try:
        for ckpt in ckpts:
            t0 = time.perf_counter()
            callback(ProfileProgress(name, ckpt, None, "loading", counter["done"], counter["total"]))
            loaded: Any = open_streamed(ckpt, **load_kw) if config.loading.stream else load(ckpt, **load_kw)
            model = loaded.model
            step = loaded.step if loaded.step is not None else (step_from_name(ckpt) or 0)
            if any(r["step"] == step for r in record):
                raise ValueError(f"{ckpt}: step {step} was already profiled in run {name!r} "
                                 f"(from {next(r['path'] for r in record if r['step'] == step)})")
            callback(ProfileProgress(name, ckpt, step, "data", counter["done"], counter["total"]))
            data = source.get(ckpt)
            data.check_vocab(model.config.vocab_size)
            log.info("profiling %s (step %d) on %s", ckpt, step, data.name)

            def on_batch(phase: str, ckpt: Path = ckpt, step: int = step) -> None:
                counter["done"] += 1
                callback(ProfileProgress(name, ckpt, step, phase, counter["done"], counter["total"]))

            if config.loading.stream:
                frame = profile_streamed(loaded, data, config, step=step, run_id=name, on_unit=on_batch)
            else:
                frame = profile_model(model, data, config, step=step, run_id=name, on_batch=on_batch)
            if writer is None:
                tmp = temporary_dir(dest)
                checkpoints = [{"path": str(c), "config": read_config(c)} for c in ckpts]
                meta = {"kind": "profile", "profile": {**options, "checkpoints": checkpoints},
                        "model_config": model.config.to_dict()}
                writer = ProbeWriter(tmp / PROBES_DIR, name, meta)
            for row in frame.itertuples(index=False):
                writer.add(row.step, row.layer, row.site, row.direction, row.stat, row.value)
            writer.end_step()
            val = frame.loc[(frame["stat"] == "val_loss") & (frame["layer"] == MODEL_LAYER), "value"]
            ev = config.evaluation
            record.append({"path": str(ckpt), "step": step, "config": loaded.config, "tokenizer": data.tokenizer,
                           "val_loss": float(val.iloc[0]) if len(val) else math.nan,
                           "target_tokens": data.num_targets(*ev.sizes),
                           "seconds": round(time.perf_counter() - t0, 3)})
            del model, loaded
        assert writer is not None and tmp is not None
        writer.close()
        summary = {"run_id": name, **options, "checkpoints": record}
        (tmp / PROFILE_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        publish_dir(tmp, dest)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote profile %s (%d checkpoints)", dest, len(record))
    return dest


def profile_checkpoint(path: str | Path, out: str | Path, config: ProfileConfig | None = None,
                       **kwargs: Any) -> Path:
    """Profile one checkpoint (a run folder means its latest) into ``out/RUN_ID``; returns that folder.

    Takes the arguments of :func:`profile_many`."""
    p = Path(path)
    if p.exists() and not (p / CONFIG_NAME).is_file():
        found = step_checkpoints(p) if p.is_dir() else []
        p = found[-1] if found else resolve_checkpoint(p)
    return profile_many([p], out, config, **kwargs)[0]


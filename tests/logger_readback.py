"""Reading back what the loggers wrote, through each tool's own reading code (no mocks), and the summary a
recorded step should give, written out from the README's names (not from the library's own mapping).
Import after ``pytest.importorskip`` of the tool read."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

#: The README's names: (site, direction, stat) of a per-layer row -> its series.
SERIES = {("resid_post", "fwd", "var"): "var/resid_post", ("attn", "fwd", "shortcut_branch_ratio"): "ratio/attn",
          ("mlp", "fwd", "shortcut_branch_ratio"): "ratio/mlp", ("params", "none", "grad_norm"): "grad_norm",
          ("gpas", "none", "scale"): "gate_scale"}
MODEL = ("loss", "val_loss", "lr", "grad_norm")

Summaries = dict[int, dict[str, float]]  # step -> metric name -> value


def expected_summaries(frame: pd.DataFrame, prefix: str = "gpas") -> Summaries:
    """The summary of every recorded step (a step with per-layer rows) of a probe table, by the README's
    names: ``gpas/var/resid_post/layer_07`` ..., ``gpas/model/loss`` ... (layers of 2 digits: < 100 layers)."""
    recorded = set(frame[frame.layer >= 0].step)
    out: Summaries = {}
    for row in frame[frame.step.isin(recorded)].itertuples():
        if row.layer == -1:
            if row.site != "model" or row.stat not in MODEL:
                continue
            name = f"{prefix}/model/{row.stat}"
        elif (row.site, row.direction, row.stat) in SERIES:
            name = f"{prefix}/{SERIES[row.site, row.direction, row.stat]}/layer_{row.layer:02d}"
        else:
            continue
        out.setdefault(int(row.step), {})[name] = float(row.value)
    assert out, "the table has no recorded step"
    return out


# -- readers -----------------------------------------------------------------------------------------
def read_tensorboard(folder: Path, prefix: str = "") -> tuple[Summaries, object]:
    """Every scalar of the event files in ``folder`` whose tag starts with ``prefix`` (step -> tag -> value,
    each once) and the accumulator, read by TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    out: Summaries = {}
    for tag in acc.Tags()["scalars"]:
        if not tag.startswith(prefix):
            continue
        for event in acc.Scalars(tag):
            assert tag not in out.get(event.step, {}), f"{tag} twice at step {event.step}"
            out.setdefault(event.step, {})[tag] = event.value
    return out, acc


LOG_HEADER, LOG_RECORD, LOG_BLOCK = struct.Struct("<4sHB"), struct.Struct("<IHB"), 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[object]:
    """The records of an offline W&B run's ``.wandb`` file: W&B's log format (a ':W&B' header, then
    LevelDB-style 32 KiB blocks of checksummed chunks), each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = LOG_HEADER.unpack_from(data, 0)
    assert (ident, magic) == (b":W&B", 0xBEE1), (ident, magic)
    pos, pending = LOG_HEADER.size, b""
    while pos + LOG_RECORD.size <= len(data):
        left = LOG_BLOCK - pos % LOG_BLOCK
        if left < LOG_RECORD.size:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        checksum, length, kind = LOG_RECORD.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zeros: the end of what was written
            break
        chunk = data[pos + LOG_RECORD.size:pos + LOG_RECORD.size + length]
        pos += LOG_RECORD.size + length
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum, f"bad checksum at {pos}"
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb(root: Path) -> tuple[list[dict[str, object]], list[object], Path]:
    """The one offline run under ``root``: its history rows (key -> value, as logged), its metric
    definitions (``define_metric``) and its run folder."""
    files = sorted(root.rglob("*.wandb"))
    assert len(files) == 1, files
    history, metrics = [], []
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "metric":
            metrics.append(record.metric)
    return history, metrics, files[0].parent


def read_mlflow(uri: str) -> tuple[Summaries, object]:
    """The one run of the file store at ``uri``: step -> metric -> value (every value of each metric's
    history, by MlflowClient.get_metric_history), and the run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    out: Summaries = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            assert key not in out.get(m.step, {}), f"{key} twice at step {m.step}"
            out.setdefault(m.step, {})[key] = m.value
    return out, run


def assert_same(got: Summaries, want: Summaries, cast: Callable[[float], float] = float) -> None:
    """Same steps, same names, values equal (NaN to NaN) after ``cast`` (TensorBoard keeps float32)."""
    assert sorted(got) == sorted(want)
    for step in want:
        assert sorted(got[step]) == sorted(want[step]), step
        for name, value in want[step].items():
            a, b = got[step][name], cast(value)
            assert a == b or (a != a and b != b), (step, name, a, b)


# -- runs to read back -------------------------------------------------------------------------------
def plain_loop(out: Path, log_to: object, steps: int = 5, every: int = 2, **attach: object) -> pd.DataFrame:
    """A user's own loop with ``attach(model, out, every=every, log_to=log_to)`` on the tiny GPAS model
    (a validation loss given on step 4); returns the probe table."""
    import torch

    import gpas_probe
    from gpas_probe import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", gpas=True)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    with gpas_probe.attach(model, out=out, every=every, optimizer=optimizer, log_to=log_to, **attach) as probe:
        for step in range(1, steps + 1):
            x, y = (torch.randint(0, config.vocab_size, (2, 16), generator=g) for _ in range(2))
            loss = model(x, y).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            probe.step(step, loss=loss, val_loss=2.5 if step == 4 else None)
    return gpas_probe.load_run(out)


def train_args(out: Path, data: Path, *extra: str) -> list[str]:
    """``gpas-probe train`` on the tiny GPAS model: 4 steps, probes on steps 1, 2 and 4, validation on 2 and 4."""
    return ["train", "--preset", "tiny", "--gpas", "--steps", "4", "--batch-size", "2", "--seq-len", "16",
            "--probe-every", "2", "--eval-every", "2", "--data", str(data), "--device", "cpu", "--out", str(out),
            *extra]

"""``gpas-probe profile``: forward/backward statistics and layer importance of trained checkpoints."""

from __future__ import annotations

import json
from contextlib import ExitStack
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from gpas_probe.cli.common import console, friendly_errors, progress_bar, setup_logging
from gpas_probe.profile import PROFILE_FILE, ProfileProgress, profile_many


class Backend(str, Enum):
    auto = "auto"
    native = "native"
    hf = "hf"


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@friendly_errors
def profile_cmd(
    ckpts: list[Path] = typer.Argument(..., help="Checkpoint folders, run folders (every step checkpoint) or "
                                                 "folders of step_* checkpoints."),
    out: Path = typer.Option(Path("profiles"), "--out", "-o", help="Output folder; each run goes to OUT/RUN_ID."),
    data: str = typer.Option("builtin", help="'builtin' (validation split of Python's stdlib source), a text "
                                             "file, or .npy/.bin tokens."),
    tokenizer: Path = typer.Option(None, help="tokenizer.json for text data (default: the checkpoint's own if it "
                                              "has one, else bytes)."),
    batches: int = typer.Option(8, help="Evaluation batches."),
    batch_size: int = typer.Option(8, help="Sequences per batch."),
    seq_len: int = typer.Option(256, help="Tokens per sequence."),
    norm: str = typer.Option(None, help="The scheme, where the weights cannot tell (post or deepnorm; lns)."),
    post_layers: int = typer.Option(None, help="Mix-LN: number of leading post-norm layers."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    dtype: DType = typer.Option(None, help="Cast the weights (default: as stored)."),
    run_id: str = typer.Option(None, "--run-id", help="Put everything given into OUT/RUN_ID (default: one folder "
                                                      "per run, named after it)."),
    latest: bool = typer.Option(False, "--latest", help="Only the latest checkpoint of each run folder."),
    no_importance: bool = typer.Option(False, "--no-importance", help="Skip layer importance."),
    no_activations: bool = typer.Option(False, "--no-activations", help="Skip forward/backward statistics."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace earlier profiles of the same runs."),
    backend: Backend = typer.Option(Backend.auto, help="How checkpoints load: auto (natively when supported, else "
                                                       "with transformers, the hf extra), native, or hf."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    """Profile checkpoints: per-site statistics and layer importance, in the training parquet schema."""
    setup_logging(verbose)
    with ExitStack() as stack:
        bar: dict[str, Any] = {}

        def on_progress(p: ProfileProgress) -> None:
            if not bar:  # opened on the first batch, so that bad input gives just its error line
                bar["bar"], bar["task"] = stack.enter_context(
                    progress_bar("profile", p.total, "{task.fields[what]}", what=""))
            bar["bar"].update(bar["task"], completed=p.completed, total=p.total,
                              what=f"{p.run_id} step {p.step} {p.phase}")

        written = profile_many(
            ckpts, out, data=data, tokenizer=tokenizer, batches=batches, batch_size=batch_size, seq_len=seq_len,
            norm=norm, post_layers=post_layers, device=device, dtype=dtype.value if dtype else None, run_id=run_id,
            importance=not no_importance, activations=not no_activations, latest=latest, overwrite=overwrite,
            backend=backend.value, callback=on_progress)
    for folder in written:
        record = json.loads((folder / PROFILE_FILE).read_text())["checkpoints"]
        steps = ", ".join(str(r["step"]) for r in record)
        last = record[-1]["val_loss"]
        console.print(f"profiled {len(record)} checkpoint(s) (step {steps}) into {folder}; "
                      f"validation loss {last:.4f} at step {record[-1]['step']}", highlight=False, soft_wrap=True)

"""``gpas-probe profile``: forward/backward statistics and layer importance of trained checkpoints."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from gpas_probe.cli.common import console, friendly_errors, print_next, setup_logging
from gpas_probe.config import BACKENDS
from gpas_probe.profile.config import DELETION_MODES

Opt = typer.Option


Backend = Enum("Backend", {name: name for name in BACKENDS}, type=str)  # type: ignore[misc]
Importance = Enum("Importance", {name: name for name in DELETION_MODES}, type=str)  # type: ignore[misc]
DType = Enum("DType", {name: name for name in ("fp32", "bf16", "fp16")}, type=str)  # type: ignore[misc]


@friendly_errors
def profile_cmd(
    ckpts: Annotated[list[Path], typer.Argument(help="Checkpoint folders, run folders (every step checkpoint) or "
                                                     "folders of step_* checkpoints.")],
    out: Annotated[Path, Opt("--out", "-o", help="Output folder; each run goes to OUT/RUN_ID.")] = Path("profiles"),
    data: Annotated[str, Opt(help="'builtin' (validation split of Python's stdlib source), a text file, or "
                                  ".npy/.bin tokens.")] = "builtin",
    tokenizer: Annotated[Path | None, Opt(help="tokenizer.json for text data (default: the checkpoint's own if it "
                                               "has one, else bytes).")] = None,
    batches: Annotated[int, Opt(help="Evaluation batches.")] = 8,
    batch_size: Annotated[int, Opt(help="Sequences per batch.")] = 8,
    seq_len: Annotated[int | None, Opt(help="Tokens per sequence (default: the length the run was trained on, "
                                            "else the model's maximum up to 256).")] = None,
    norm: Annotated[str | None, Opt(help="The scheme, where the weights cannot tell (post or deepnorm; lns).")
                    ] = None,
    post_layers: Annotated[int | None, Opt(help="Mix-LN: number of leading post-norm layers.")] = None,
    device: Annotated[str, Opt(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[DType | None, Opt(help="Cast the weights (default: as stored).")] = None,
    threads: Annotated[int, Opt(help="CPU threads (0: as many as cores are free, re-checked during the run).")] = 0,
    run_id: Annotated[str | None, Opt("--run-id", help="Put everything given into OUT/RUN_ID (default: one folder "
                                                       "per run, named after it).")] = None,
    latest: Annotated[bool, Opt("--latest", help="Only the latest checkpoint of each run folder.")] = False,
    stream: Annotated[bool, Opt("--stream", help="For models larger than memory: read one decoder layer's "
                                                 "weights at a time (safetensors, loaded natively); the same "
                                                 "rows.")] = False,
    no_importance: Annotated[bool, Opt("--no-importance", help="Skip layer importance.")] = False,
    importance: Annotated[Importance, Opt(help="Deletion importance: exact (re-run the later layers for each "
                                               "deleted one), estimate (first order, from the backward pass: "
                                               "nearly free, ranks layers only roughly), or both (their "
                                               "agreement shows in diagnose).")] = Importance.exact,  # type: ignore[attr-defined]
    no_activations: Annotated[bool, Opt("--no-activations", help="Skip forward/backward statistics.")] = False,
    skip_first_position: Annotated[bool, Opt("--skip-first-position", help="Leave position 0 of every window "
                                             "out of the statistics (the attention sink of trained LLMs).")] = False,
    outlier_factor: Annotated[float, Opt(help="A token is an outlier (a sink, a massive activation) when its RMS "
                                             "exceeds this multiple of the median token's.")] = 10.0,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace earlier profiles of the same runs.")] = False,
    backend: Annotated[Backend, Opt(help="How checkpoints load: auto (natively when supported, else with "
                                         "transformers, the hf extra), native, or hf.")] = Backend.auto,  # type: ignore[attr-defined]
    verbose: Annotated[bool, Opt("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """Profile checkpoints: per-site statistics and layer importance, in the training parquet schema."""
    from gpas_probe.profile import PROFILE_FILE, ProfileConfig, profile_many  # imports torch: only when profiling

    setup_logging(verbose)
    config = ProfileConfig.of(
        data=data, tokenizer=tokenizer, batches=batches, batch_size=batch_size, seq_len=seq_len, norm=norm,
        post_layers=post_layers, device=device, dtype=dtype.value if dtype else None, backend=backend.value,
        stream=stream, threads=threads, importance=not no_importance, deletion=importance.value,
        activations=not no_activations, skip_first_position=skip_first_position, outlier_factor=outlier_factor)
    written = profile_many(ckpts, out, config, run_id=run_id, latest=latest, overwrite=overwrite, progress="auto")
    for folder in written:
        summary = json.loads((folder / PROFILE_FILE).read_text())
        record, data = summary["checkpoints"], summary["data"]
        steps = ", ".join(str(r["step"]) for r in record)
        last = record[-1]["val_loss"]
        console.print(f"profiled {len(record)} checkpoint(s) (step {steps}) into {folder}; "
                      f"validation loss {last:.4f} at step {record[-1]['step']}; windows of {data['seq_len']} "
                      f"tokens ({data.get('seq_len_from', 'as given')})", highlight=False, soft_wrap=True)
    if len(written) == 1:
        print_next(["diagnose", written[0]], ["plot", "importance", written[0]])
    elif written:
        print_next(["diagnose", *written], ["plot", "importance", *written])

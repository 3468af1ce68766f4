"""Peak memory of a profile, in memory and streamed, each measured in a fresh process.

Writes a checkpoint of random weights in the chosen dtype (one safetensors shard per decoder layer,
written one layer at a time), random evaluation tokens, then profiles it in child processes, each
reporting its own peak resident memory (``VmHWM``) and that before the profile (Python, torch and
the package loaded):

- ``in memory``: ``gpas-probe profile`` as usual (the whole model loaded);
- ``streamed``: ``--stream`` (one layer's weights at a time).

Goals: streaming a ``1b`` checkpoint in bf16 (2.7 GB of weights) stays under 1 GB; in memory, the peak
stays within the weights, their gradients (the statistics need them) and the activations of the batch.

    python benchmarks/profile_memory.py --preset 1b --dtype bf16 --modes streamed
    python benchmarks/profile_memory.py --layers 30 --hidden 576 --heads 9 --kv-heads 3 --ffn 1536 --vocab 49152
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _machine import describe
from _shape import add_shape_options, shape_config
from safetensors.torch import save_file

from gpas_probe.checkpoints.layout import hf_config, parameter_map
from gpas_probe.config import ModelConfig
from gpas_probe.model import build_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def write_checkpoint(config: ModelConfig, dtype: torch.dtype, folder: Path) -> int:
    """Random weights (std 0.02, norms 1) as one shard per layer plus the rest; returns the weight bytes."""
    with torch.device("meta"):
        model = build_model(config)
    params = parameter_map(model)
    shards: dict[str, list[str]] = {}
    for key in params:
        part = key.split(".")[2] if key.startswith("model.layers.") else "rest"
        shards.setdefault(part, []).append(key)
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, keys in enumerate(shards.values()):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key in keys:
            shape = params[key].shape
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            tensors[key] = t.to(dtype)
            total += tensors[key].numel() * tensors[key].element_size()
            weight_map[key] = name
        save_file(tensors, folder / name, metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(hf_config(config, 0)))
    return total


CHILD = """
import json, re, sys, time
from gpas_probe.profile import ProfileConfig, profile_many
import torch
torch.set_num_threads({threads})
def hwm():  # peak resident memory of this process (reset by exec, unlike ru_maxrss)
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
base = hwm()
t0 = time.perf_counter()
profile_many([{ckpt!r}], {out!r}, ProfileConfig.of(data={data!r}, batches={batches}, batch_size={batch_size},
             seq_len={seq_len}, stream={stream}, activations={activations}, device="cpu"), progress="off")
print(json.dumps({{"base_kb": base, "peak_kb": hwm(),
                  "seconds": time.perf_counter() - t0}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="a model preset (default: the shape options below)")
    add_shape_options(parser)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="in memory,streamed", help="comma-separated: in memory, streamed")
    parser.add_argument("--no-activations", action="store_true", help="importance only (no gradients)")
    a = parser.parse_args()
    if a.preset:
        config = ModelConfig.from_preset(a.preset)
    else:
        config = shape_config(a)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        ckpt.mkdir()
        t0 = time.perf_counter()
        weights = write_checkpoint(config, DTYPES[a.dtype], ckpt)
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, a.batches * a.batch_size * a.seq_len + 1)
        np.save(Path(tmp) / "tokens.npy", tokens.astype(np.int64))
        print(f"wrote {weights / 1e9:.2f} GB of {a.dtype} weights in {time.perf_counter() - t0:.0f} s")
        results = {}
        for mode in [m.strip() for m in a.modes.split(",")]:
            code = CHILD.format(threads=a.threads, ckpt=str(ckpt), out=str(Path(tmp) / mode.replace(" ", "_")),
                                data=str(Path(tmp) / "tokens.npy"), batches=a.batches, batch_size=a.batch_size,
                                seq_len=a.seq_len, stream=mode == "streamed", activations=not a.no_activations)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{mode}: failed\n{proc.stderr[-2000:]}")
                continue
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[mode] = {k: v * 1024 / 1e9 if k.endswith("_kb") else v for k, v in results[mode].items()}
            print(f"{mode:10s} peak {r['peak_kb']:6.2f} GB (before the profile {r['base_kb']:.2f} GB, "
                  f"added {r['peak_kb'] - r['base_kb']:.2f} GB), {r['seconds']:.1f} s", flush=True)
    print(f"\nmachine: {describe(f'torch {torch.__version__}', f'{a.threads} threads')}")
    print(f"model: {config.num_layers} layers x {config.hidden_size}, ffn {config.intermediate_size}, vocab "
          f"{config.vocab_size}, {a.dtype}, weights {weights / 1e9:.2f} GB; tokens {a.batches} x {a.batch_size} x "
          f"{a.seq_len}; {'importance only' if a.no_activations else 'statistics and importance'}")
    for mode, r in results.items():
        print(f"summary | {mode} peak {r['peak_kb']:.2f} GB = {r['peak_kb'] * 1e9 / weights:.2f} x the weights"
              + (f" | goal < 1 GB | {'met' if r['peak_kb'] < 1 else 'missed'}" if mode == "streamed" else ""))


if __name__ == "__main__":
    main()

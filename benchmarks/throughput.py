"""Training throughput (forward + backward tokens/s) of our model against transformers' LlamaForCausalLM.

Both models have the same configuration (hidden, ffn, heads, kv heads, layers, vocabulary, sequence
length) and the same weights (ours copied into the Hugging Face one through the checkpoint key map;
the script checks that the two losses agree), the Hugging Face one with ``attn_implementation="sdpa"``.
Both get the same inputs and next-token targets (Hugging Face's ``shift_labels``), so the losses match.
A timed step is forward with labels, backward, ``zero_grad(set_to_none=True)``: the work of a training
step without the optimizer, which is the same code for both. The two take turns step by step (ABAB,
the order swapped every round) in one process; each round gives the ratio of their step times, and
the median ratio is reported with the best-of and median step times of each. On CPU the models run
in fp32; ``--dtype bf16`` runs both under bf16 autocast, as :func:`gpas_probe.train` does on
CUDA. ``--compile`` adds our model under ``torch.compile`` (a C++ compiler is needed on CPU, Triton
on GPU) to measure the compiled speed-up.

Goal: ours / Hugging Face >= 1.0x, on CPU and on GPU.

    python benchmarks/throughput.py                          # small preset (24 x 64), batch 16 x 128
    python benchmarks/throughput.py --preset medium --threads 2
    python benchmarks/throughput.py --device cuda --preset 71m --dtype bf16 --batch-size 32 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from _machine import torch_machine, torch_setup

from gpas_probe.checkpoints import hf_config, parameter_map
from gpas_probe.config import ModelConfig, get_preset
from gpas_probe.model import build_model

GOAL = 1.0


def machine(device: torch.device) -> str:
    return torch_machine(device)


def hf_twin(ours: torch.nn.Module, config: ModelConfig) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with ``ours``'s configuration and weights (sdpa attention)."""
    import transformers

    fields = hf_config(config)
    for k in ("gpas_probe", "architectures", "model_type", "torch_dtype", "rope_theta", "rope_scaling"):
        fields.pop(k)
    if config.rope_scaling is not None:
        raise SystemExit("error: this benchmark compares models without rope scaling")
    hc = transformers.LlamaConfig(**fields, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta})
    hf = transformers.LlamaForCausalLM._from_config(hc, attn_implementation="sdpa")
    state = {k: p.detach() for k, p in parameter_map(ours).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("rotary_emb.inv_freq")]:
        raise SystemExit(f"error: weights do not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    return hf


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", help="model preset (default: small, 24 layers x 64)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=0, help="default: the preset's")
    ap.add_argument("--rounds", type=int, default=30, help="timed steps of each model")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: bf16 autocast for both")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    args = ap.parse_args()
    device = torch_setup(args.threads, args.device)

    config = ModelConfig.from_preset(args.preset)
    seq = args.seq_len or get_preset(args.preset).train.get("seq_len", 128)
    torch.manual_seed(0)
    ours = build_model(config).to(device).train()
    hf = hf_twin(ours, config).to(device).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, seq + 1), generator=g).to(device)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # inputs and next-token targets, as train() has them
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.dtype == "bf16" else nullcontext

    def step(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor]) -> Callable[[], float]:
        def run() -> float:
            sync(device)
            t0 = time.perf_counter()
            with autocast():
                loss = loss_of()
            loss.backward()
            model.zero_grad(set_to_none=True)
            sync(device)
            return time.perf_counter() - t0
        return run

    steps = {"ours": step(ours, lambda: ours(x, y).loss),
             "transformers": step(hf, lambda: hf(input_ids=x, labels=y, shift_labels=y).loss)}
    if args.compile:
        compiled = torch.compile(ours)
        steps["ours compiled"] = step(ours, lambda: compiled(x, y).loss)

    print(f"machine: {machine(device)}")
    print(f"model: {args.preset} preset, {config.num_layers} layers x {config.hidden_size} (ffn "
          f"{config.intermediate_size}, {config.num_heads} heads, {config.num_kv_heads} kv heads, vocab "
          f"{config.vocab_size}), {ours.num_parameters():,} parameters; batch {args.batch_size} x {seq}; "
          f"{device}, {args.dtype}; {args.rounds} timed steps each after {args.warmup} warm-up steps")
    with torch.no_grad(), autocast():
        a, b = ours(x, y).loss.float(), hf(input_ids=x, labels=y, shift_labels=y).loss.float()
    print(f"same weights, same loss: ours {a.item():.6f}, transformers {b.item():.6f} "
          f"(|diff| {abs(a.item() - b.item()):.1e})")

    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.warmup + args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t = steps[n]()
            if r >= args.warmup:
                times[n].append(t)
    tokens = args.batch_size * seq
    print()
    for n in names:
        best, med = min(times[n]), statistics.median(times[n])
        print(f"{n:14s}: median {med * 1e3:8.2f} ms/step ({tokens / med:9.0f} tokens/s), best {best * 1e3:8.2f} ms")
    paired = [statistics.median(h / o for o, h in zip(times[n], times["transformers"], strict=True)) for n in names]
    print("\nsummary | comparison | tokens/s ratio (median of per-round ratios) | best/best | goal | verdict")
    for n, ratio in zip(names, paired, strict=True):
        if n == "transformers":
            continue
        best_ratio = min(times["transformers"]) / min(times[n])
        verdict = "met" if ratio >= GOAL else f"missed by {GOAL - ratio:.1%}"
        print(f"summary | {n} / transformers | {ratio:.3f}x | {best_ratio:.3f}x | >= {GOAL:.1f}x | {verdict}")
    if args.compile:
        ratio = statistics.median(o / c for o, c in zip(times["ours"], times["ours compiled"], strict=True))
        print(f"summary | ours compiled / ours eager | {ratio:.3f}x | "
              f"{min(times['ours']) / min(times['ours compiled']):.3f}x | - | -")


if __name__ == "__main__":
    main()

"""Where a profile's time goes, as multiples of one plain forward pass over the same tokens.

Builds a model of a real pretrained shape (default: 30 layers, 576 wide, 9 heads over 3 KV heads, MLP
1536, a 49,152-token vocabulary, tied embeddings: the shape of a 135M LLaMA-family model) with random
weights, and times in one process, on the same tokens, interleaved over ``--repeats`` rounds (median):

- ``forward``: the model's loss, no gradients (the unit);
- ``forward+backward``: the loss and its backward, no probe (for reference);
- ``statistics``: a profile's forward and backward statistics (every probe family, with intervals);
- ``importance``: a profile's layer importance pass (exact deletion of every layer, angular distance,
  block influence), and ``importance (estimate)`` with the first-order estimate in place of exact deletion;
- ``naive deletion``: deleting each layer and re-running the whole model (the reference that prefix
  reuse must beat);
- ``profile``: the whole profile as ``gpas-probe profile`` runs it (``--importance exact``), and
  ``profile (estimate)`` with ``--importance estimate``.

The arithmetic of exact deletion is counted too (matrix multiply-adds of the layers and the head, with
attention's ``T^2`` terms), to say how close the measured time comes to what prefix reuse must compute.
``--backend hf`` times a ``transformers`` ``LlamaForCausalLM`` with the same weights.

Goals: statistics <= 4 forward-equivalents; exact deletion <= 0.6 x the naive re-runs and close to its
arithmetic; angular distance and block influence free (no pass of their own).

    python benchmarks/profile_cost.py                                 # 30 x 576, vocab 49k, 2 x 128 tokens
    python benchmarks/profile_cost.py --backend hf
    python benchmarks/profile_cost.py --layers 12 --hidden 256 --vocab 8192 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from _machine import torch_machine, torch_setup
from _shape import add_shape_options, shape_config

from gpas_probe.analysis.importance import naive_deletion_importance
from gpas_probe.evaldata import EvalData
from gpas_probe.model import build_model
from gpas_probe.profile import ProfileConfig, profile_model


def _hf_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``LlamaForCausalLM`` with our model's weights (the checkpoint key map)."""
    import transformers

    from gpas_probe.checkpoints.layout import hf_config, parameter_map

    cfg = hf_config(model.config, None)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in cfg.items()
                                                                    if k != "gpas_probe"}))
    state = {k: p.detach() for k, p in parameter_map(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    return hf.eval()


def layer_flops(a: argparse.Namespace) -> tuple[float, float]:
    """Multiply-adds per token of one decoder layer (projections, MLP, attention's T^2 terms averaged over
    causal positions) and of the head."""
    head_dim = a.hidden // a.heads
    proj = a.hidden * head_dim * (2 * a.heads + 2 * a.kv_heads) + 3 * a.hidden * a.ffn
    attention = 2 * a.heads * head_dim * (a.seq_len + 1) / 2
    return proj + attention, a.hidden * a.vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_options(parser)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--backend", choices=["native", "hf"], default="native")
    parser.add_argument("--skip-naive", action="store_true", help="leave out the (slow) naive deletion")
    a = parser.parse_args()
    device = torch_setup(a.threads, "cpu")
    torch.manual_seed(0)
    model = build_model(shape_config(a)).eval()
    if a.backend == "hf":
        model = _hf_copy(model)
    tokens = np.random.default_rng(0).integers(0, a.vocab, a.batches * a.batch_size * a.seq_len + 1)
    data = EvalData("random", tokens.astype(np.int64), "tokens", "random")
    sizes = (a.batch_size, a.seq_len, a.batches)
    batches = list(data.batches(*sizes))

    def forward() -> None:
        with torch.inference_mode():
            for ids, labels, _ in batches:
                model(ids, labels=labels) if a.backend == "hf" else model(ids, labels)

    def forward_backward() -> None:
        for ids, labels, _ in batches:
            out = model(ids, labels=labels) if a.backend == "hf" else model(ids, labels)
            out.loss.backward()
        model.zero_grad(set_to_none=True)

    def profile(**measure: object) -> Callable[[], None]:
        config = ProfileConfig.of(batches=a.batches, batch_size=a.batch_size, seq_len=a.seq_len, **measure)
        return lambda: profile_model(model, data, config)

    def naive() -> None:
        naive_deletion_importance(model, [(ids, labels, mask) for ids, labels, mask in batches])

    parts: dict[str, Callable[[], None]] = {
        "forward": forward, "forward+backward": forward_backward,
        "statistics": profile(importance=False),
        "importance": profile(activations=False),
        "importance (estimate)": profile(activations=False, deletion="estimate"),
        "profile": profile(),
        "profile (estimate)": profile(deletion="estimate"),
    }
    if not a.skip_naive and a.backend == "native":
        parts["naive deletion"] = naive
    times: dict[str, list[float]] = {k: [] for k in parts}
    forward()  # warm-up
    for r in range(a.repeats):
        order = list(parts) if r % 2 == 0 else list(reversed(parts))
        for name in order:
            t0 = time.perf_counter()
            parts[name]()
            times[name].append(time.perf_counter() - t0)
            print(f"  round {r + 1}: {name} {times[name][-1]:.2f} s", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    unit = med["forward"]
    L = a.layers
    per_layer, head = layer_flops(a)
    fwd_flops = L * per_layer + head
    prefix_flops = L * (L - 1) / 2 * per_layer + L * head
    naive_flops = L * fwd_flops
    print(f"\nmachine: {torch_machine(device)}")
    print(f"model: {a.backend}, {L} layers x {a.hidden}, heads {a.heads}/{a.kv_heads}, ffn {a.ffn}, vocab {a.vocab}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; tokens {a.batches} x "
          f"{a.batch_size} x {a.seq_len}")
    for name, t in med.items():
        print(f"{name:24s} {t:8.2f} s  {t / unit:7.2f} x forward")
    print(f"arithmetic: exact deletion with prefix reuse = {prefix_flops / fwd_flops:.2f} forwards, naive "
          f"= {naive_flops / fwd_flops:.2f} forwards (ratio {prefix_flops / naive_flops:.3f})")
    imp = med["importance"] / unit
    print(f"summary | statistics {med['statistics'] / unit:.2f} x forward | goal <= 4 | "
          f"{'met' if med['statistics'] / unit <= 4 else 'missed'}")
    if "naive deletion" in med:
        ratio = med["importance"] / med["naive deletion"]
        verdict = "met" if ratio <= 0.6 else "missed"
        print(f"summary | importance / naive deletion {ratio:.3f} | goal <= 0.6 | {verdict}")
    print(f"summary | importance {imp:.2f} x forward against {prefix_flops / fwd_flops:.2f} forwards of arithmetic "
          f"(+1 forward for the states) | reported")
    print(f"summary | profile {med['profile'] / unit:.2f} x forward = statistics + importance "
          f"{(med['statistics'] + med['importance']) / unit:.2f} | reported")


if __name__ == "__main__":
    main()

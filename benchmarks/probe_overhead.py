"""Training-step overhead of the probes: recording every step, every 10, every 100, and no probes; and
recording every step and every 100 with a TensorBoard logger attached (``--log-to tensorboard``).

One model and one optimizer; the variants (no probe, a :class:`~gpas_probe.probes.Probe` recording
every 1, 10 and 100 of its own steps, and probes recording every 1 and 100 steps that also send each
recorded step's summary to TensorBoard) take turns step by step in one process, in an order that
rotates every round, so drifting machine load hits every variant alike. A step mirrors
:func:`gpas_probe.train`: lr update, ``begin_step``, forward (bf16 autocast with ``--dtype
bf16``, as ``train`` does on CUDA), backward, ``after_backward``, global gradient clip, gate clip,
``optimizer.step()``, ``zero_grad``, ``loss.item()``, ``end_step`` with a
:class:`~gpas_probe.training.StepInfo`. The probes write their parquet chunks to a temporary folder
(flushes included).

Each round yields, per variant, the ratio of its step time to the no-probe step of the same round;
the medians of those ratios give the cost of a recorded and of a not-recorded step, and the
amortised overhead of recording every N steps is ``(recorded + (N - 1) x not recorded) / N``. The
ratio of total times over the run is printed as a cross-check (noisier: it is a mean). On a CPU
both wall-clock and process CPU time are reported (CPU time is less disturbed by other processes).
``--breakdown`` instead times each statistic family alone, recording every step; ``--floor`` times, beside
the full probe, what no exact recorded step can avoid on the same tensors (each distinct tensor the probes
read, forward and backward, read once; and reduced per token with the kernels the statistics need, into
one buffer, with no bookkeeping). The logger variants
(left out with ``--no-logger``, or when the ``tensorboard`` package is missing) are reported apart: their
recorded and not-recorded steps against the same no-probe steps.

Goals: every-step overhead <= 5% for the ``small`` preset on a CPU with 1 thread, <= 3% for ``medium``
and on a GPU; every-100 <= 1%; a not-recorded step costs the same as a step with no probes.

    python benchmarks/probe_overhead.py                        # small preset (24 x 64), CPU, 1 thread
    python benchmarks/probe_overhead.py --threads 2 --rounds 100
    python benchmarks/probe_overhead.py --breakdown --rounds 30
    python benchmarks/probe_overhead.py --floor --rounds 30
    python benchmarks/probe_overhead.py --preset tiny --rounds 3 --warmup 1   # does it run?
    python benchmarks/probe_overhead.py --compile              # as train --compile
    python benchmarks/probe_overhead.py --device cuda --preset 71m --dtype bf16
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch
from _machine import torch_machine, torch_setup

from gpas_probe.config import ModelConfig, TrainConfig, get_preset
from gpas_probe.gpas import clip_gate_grad_
from gpas_probe.loggers import LogConfig
from gpas_probe.model import SITES, build_model, probed_layers
from gpas_probe.probes import FAMILIES, Driver, Every, Probe, ProbeConfig
from gpas_probe.probes.accumulator import stat_dtype
from gpas_probe.probes.config import ACTIVATION_SITES
from gpas_probe.training import StepInfo, make_optimizer

TRAINING = Driver(grads_at_backward_end=True, grad_norm_given=True)  # the driver train() is, in one process

EVERY = (1, 10, 100)
LOGGED = (1, 100)  # schedules also run with a TensorBoard logger attached
LOGGER = " + tensorboard"
GOALS = {"small": {1: 0.05, 100: 0.01}, "other": {1: 0.03, 100: 0.01}}
NOT_RECORDED_TOLERANCE = 0.01  # a not-recorded step within 1% of a plain one counts as "the same"


def machine(device: torch.device) -> str:
    return torch_machine(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Sample(NamedTuple):
    wall: float
    cpu: float
    recorded: bool


class Runner:
    """One training step as :func:`gpas_probe.train` runs it, with the given observers."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device, autocast: bool,
                 batches: list[tuple[torch.Tensor, torch.Tensor]], compile: bool = False) -> None:
        self.model, self.cfg, self.device, self.batches = model, cfg, device, batches
        # as train(compile=True): unrecorded steps run the compiled model, recorded ones the eager one
        self.compiled = torch.compile(model) if compile else model
        self.optimizer = make_optimizer(model, cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.autocast = autocast
        self.tokens_per_step = cfg.batch_size * cfg.seq_len

    def step(self, step: int, observers: list[Probe], batch_index: int) -> tuple[float, float]:
        """Run update ``step`` with ``observers``; returns its (wall, process CPU) time in seconds."""
        model, cfg, device = self.model, self.cfg, self.device
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for g in self.optimizer.param_groups:
            g["lr"] = cfg.lr
        for o in observers:
            o.begin_step(step)
        x, y = self.batches[batch_index % len(self.batches)]
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        recorded = any(o.recording_step == step for o in observers)
        with ctx:
            loss = (model if recorded else self.compiled)(x, y).loss
        loss.backward()
        for o in observers:
            o.after_backward(step)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        clip_gate_grad_(model, cfg.gate_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        info = StepInfo(step, loss_value, self.optimizer.param_groups[0]["lr"], float(grad_norm),
                        step * self.tokens_per_step, 0.0)
        for o in observers:
            o.end_step(info)
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0


def interleave(runner: Runner, probes: dict[str, Probe | None], rounds: int, warmup: int) -> list[dict[str, Sample]]:
    """``warmup`` + ``rounds`` rounds of one step per variant (rotating order); the timed rounds."""
    names = list(probes)
    steps = dict.fromkeys(names, 0)
    out = []
    for r in range(warmup + rounds):
        k = r % len(names)
        samples = {}
        for name in names[k:] + names[:k]:
            probe = probes[name]
            steps[name] += 1
            recorded = probe is not None and probe.schedule(steps[name])
            wall, cpu = runner.step(steps[name], [probe] if probe is not None else [], r)
            samples[name] = Sample(wall, cpu, recorded)
        if r >= warmup:
            out.append(samples)
    return out


def ratios(rounds: list[dict[str, Sample]], name: str, clock: str, recorded: bool) -> list[float]:
    """Per round: ``name``'s step time over the no-probe step time of that round, minus one."""
    return [getattr(s[name], clock) / getattr(s["none"], clock) - 1 for s in rounds if s[name].recorded == recorded]


def whole_run(rounds: list[dict[str, Sample]], name: str, clock: str) -> float:
    return sum(getattr(s[name], clock) for s in rounds) / sum(getattr(s["none"], clock) for s in rounds) - 1


def logger_variants(model: torch.nn.Module, tmp: Path, enabled: bool) -> dict[str, Probe | None]:
    """Probes recording every 1 and 100 steps with a TensorBoard logger, when asked for and installed."""
    if not enabled:
        return {}
    try:
        LogConfig.of("tensorboard").require()  # type: ignore[union-attr]
    except ImportError as e:
        print(f"no logger variants: {e}")
        return {}
    return {f"every {n}{LOGGER}": Probe(model, tmp / f"logged{n}", config=ProbeConfig(), schedule=Every(n),
                                        driver=TRAINING, log_to="tensorboard") for n in LOGGED}


def report_loggers(rounds: list[dict[str, Sample]], names: list[str], clocks: tuple[str, ...],
                   without: dict[str, tuple[float, float, dict[int, float]]]) -> None:
    """The logger variants' recorded and not-recorded steps, against the no-probe steps of their rounds."""
    print(f"\nwith a TensorBoard logger attached ({', '.join(names)}):")
    for clock in clocks:
        rec = statistics.median(v for n in names for v in ratios(rounds, n, clock, True))
        unrec = statistics.median(v for n in names for v in ratios(rounds, n, clock, False))
        print(f"  [{clock} clock] recorded step {rec:+.2%} (without a logger {without[clock][0]:+.2%}); "
              f"not-recorded step {unrec:+.2%}; every 100 {(rec + 99 * unrec) / 100:+.2%} amortised")
    clock = clocks[-1]
    rec = statistics.median(v for n in names for v in ratios(rounds, n, clock, True))
    unrec = statistics.median(v for n in names for v in ratios(rounds, n, clock, False))
    print(f"summary | recorded step + tensorboard | {rec:+.2%} | without a logger {without[clock][0]:+.2%} | -")
    same = abs(unrec) <= NOT_RECORDED_TOLERANCE
    print(f"summary | not-recorded step + tensorboard | {unrec:+.2%} | same as no probes (within "
          f"{NOT_RECORDED_TOLERANCE:.0%}) | {'met' if same else 'missed'}")


def main_schedules(args: argparse.Namespace, runner: Runner, model: torch.nn.Module, tmp: Path) -> None:
    probes: dict[str, Probe | None] = {"none": None}
    for n in EVERY:
        probes[f"every {n}"] = Probe(model, tmp / f"every{n}", config=ProbeConfig(), schedule=Every(n),
                                      driver=TRAINING)  # as train() does
    probes.update(logger_variants(model, tmp, args.logger))
    rounds = interleave(runner, probes, args.rounds, args.warmup)
    for p in probes.values():
        if p is not None:
            p.close()
    rows = len(probes["every 1"].frame()) // (args.warmup + args.rounds)  # type: ignore[union-attr]

    device = runner.device
    clocks = ("wall",) if device.type == "cuda" else ("wall", "cpu")
    base = statistics.median(s["none"].wall for s in rounds)
    print(f"\nstep with no probes: median {base * 1e3:.2f} ms wall; a recorded step writes {rows:,} rows")
    print("overheads: medians over rounds of (variant step time / no-probe step time of the same round) - 1")
    probe_names = [n for n in probes if n != "none" and not n.endswith(LOGGER)]
    results = {}
    for clock in clocks:
        rec = statistics.median(v for n in probe_names for v in ratios(rounds, n, clock, True))
        unrec = statistics.median(v for n in probe_names for v in ratios(rounds, n, clock, False))
        amortised = {n: (rec + (n - 1) * unrec) / n for n in EVERY}
        results[clock] = rec, unrec, amortised
        print(f"\n[{clock} clock]")
        print(f"  recorded step     : {rec:+8.2%}")
        print(f"  not-recorded step : {unrec:+8.2%}   (goal: the same as no probes)")
        for n in EVERY:
            print(f"  every {n:<3d}         : {amortised[n]:+8.2%} amortised;  whole-run total/total "
                  f"{whole_run(rounds, f'every {n}', clock):+.2%}")

    clock = clocks[-1]
    rec, unrec, amortised = results[clock]
    goals = GOALS["small" if args.preset == "small" and device.type == "cpu" else "other"]
    print(f"\nsummary | {clock} clock | measured | goal | verdict")
    for n in EVERY:
        goal = goals.get(n)
        verdict = "-" if goal is None else ("met" if amortised[n] <= goal else f"missed by {amortised[n] - goal:.1%}")
        print(f"summary | every {n} | {amortised[n]:+.2%} | {'-' if goal is None else f'<= {goal:.0%}'} | {verdict}")
    same = abs(unrec) <= NOT_RECORDED_TOLERANCE
    print(f"summary | not-recorded step | {unrec:+.2%} | same as no probes (within "
          f"{NOT_RECORDED_TOLERANCE:.0%}) | {'met' if same else 'missed'}")
    logged = [n for n in probes if n.endswith(LOGGER)]
    if logged:
        report_loggers(rounds, logged, clocks, results)


def main_breakdown(args: argparse.Namespace, runner: Runner, model: torch.nn.Module, tmp: Path) -> None:
    probes: dict[str, Probe | None] = {"none": None}
    for family in (*FAMILIES, "all"):
        stats = FAMILIES if family == "all" else (family,)
        probes[family] = Probe(model, tmp / family, config=ProbeConfig(stats=stats), schedule=Every(1),
                                driver=TRAINING)
    recorded_overheads(args, runner, probes, "of each statistic family alone")


def recorded_overheads(args: argparse.Namespace, runner: Runner, probes: dict[str, Any], title: str) -> None:
    """Interleave ``probes`` (each recording every step) and print each one's recorded-step overhead."""
    rounds = interleave(runner, probes, args.rounds, args.warmup)
    for p in probes.values():
        if p is not None:
            p.close()
    clock = "wall" if runner.device.type == "cuda" else "cpu"
    base = statistics.median(getattr(s["none"], clock) for s in rounds)
    print(f"\nrecorded-step overhead {title} ({clock} clock; no-probe step {base * 1e3:.2f} ms):")
    for name in probes:
        if name != "none":
            med = statistics.median(ratios(rounds, name, clock, True))
            print(f"summary | {name} | {med:+.2%} | {med * base * 1e3:+.2f} ms")


class Floor:
    """Not a probe: on every step, each distinct tensor the probes read (the activations at every hook point,
    the gradients at the activation sites) goes through ``reduce`` once, and nothing else happens: no rows,
    no bookkeeping. The observer protocol of :class:`~gpas_probe.probes.Probe`, recording every step."""

    def __init__(self, model: torch.nn.Module, reduce: Callable[[torch.Tensor], None]) -> None:
        self.blocks, self.reduce = probed_layers(model), reduce
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.recording_step: int | None = None

    def schedule(self, step: int) -> bool:
        return True

    def begin_step(self, step: int) -> None:
        self.recording_step = step
        # weak, as the probes hold them: a held gradient is not accumulated into. Autograd accumulates a
        # gradient into the object it handed to an earlier hook: new values, the same object (its version tells)
        seen: dict[int, tuple[weakref.ref, int]] = {}

        def once(x: torch.Tensor) -> None:
            ref = seen.get(id(x))
            if ref is None or ref[0]() is not x or ref[1] != x._version:
                seen[id(x)] = weakref.ref(x), x._version
                self.reduce(x.detach())

        def forward(x: torch.Tensor, grad: bool) -> None:
            if not torch.is_grad_enabled():
                return
            once(x)
            if grad and x.requires_grad:
                self.handles.append(x.register_hook(once))

        for block in self.blocks:
            for site in SITES:
                self.handles.append(getattr(block, f"hook_{site}").register_forward_hook(
                    lambda _m, _a, out, grad=site in ACTIVATION_SITES: forward(out, grad)))

    def after_backward(self, step: int) -> None:
        pass

    def end_step(self, info: StepInfo) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.recording_step = None

    def close(self) -> None:
        pass


def one_read(x: torch.Tensor) -> None:
    """One pass over ``x``: the least any statistic of it costs."""
    torch.sum(x)


class PerToken:
    """The per-token reductions the statistics need (sum, squared deviations from the token's mean in two
    passes, max, min), written into one buffer: the probes' kernels without their bookkeeping."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> None:
        x = x.to(stat_dtype(x))  # as the probes do: bf16 is reduced in float32
        key = (*x.shape, x.dtype, x.device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(4, *x.shape[:-1], 1, dtype=x.dtype, device=x.device), torch.empty_like(x)
        out, scratch = self.buffers[key]
        torch.sum(x, -1, keepdim=True, out=out[0])
        torch.sum(torch.sub(x, out[0], alpha=1 / x.shape[-1], out=scratch).pow_(2), -1, keepdim=True, out=out[1])
        torch.amax(x, -1, keepdim=True, out=out[2])
        torch.amin(x, -1, keepdim=True, out=out[3])


def main_floor(args: argparse.Namespace, runner: Runner, model: torch.nn.Module, tmp: Path) -> None:
    probes: dict[str, Probe | Floor | None] = {
        "none": None, "one read per tensor": Floor(model, one_read), "per-token reductions": Floor(model, PerToken()),
        "probe (all families)": Probe(model, tmp / "all", config=ProbeConfig(), schedule=Every(1), driver=TRAINING)}
    recorded_overheads(args, runner, probes, "against what no exact recording avoids")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", help="model preset (default: small, 24 layers x 64)")
    ap.add_argument("--gpas", action=argparse.BooleanOptionalAction, default=True,
                    help="GPAS gates in the model (adds the gate statistics); default on")
    ap.add_argument("--batch-size", type=int, default=0, help="default: the preset's, at most 16")
    ap.add_argument("--seq-len", type=int, default=0, help="default: the preset's")
    ap.add_argument("--rounds", type=int, default=120, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: bf16 autocast, as train() runs on CUDA; fp32: plain fp32, as on CPU")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--breakdown", action="store_true", help="time each statistic family alone instead")
    ap.add_argument("--floor", action="store_true",
                    help="time the probe beside one read and the per-token reductions of the same tensors instead")
    ap.add_argument("--logger", action=argparse.BooleanOptionalAction, default=True,
                    help="also run every 1 and every 100 with a TensorBoard logger attached (default on)")
    ap.add_argument("--compile", action="store_true",
                    help="as train --compile: unrecorded steps compiled, recorded steps eager")
    args = ap.parse_args()
    device = torch_setup(args.threads, args.device)

    preset = get_preset(args.preset)
    config = ModelConfig.from_preset(args.preset, gpas=args.gpas)
    batch = args.batch_size or min(16, preset.train.get("batch_size", 16))
    seq = args.seq_len or preset.train.get("seq_len", 128)
    cfg = TrainConfig(steps=10**9, lr=1e-4, batch_size=batch, seq_len=seq, device=args.device)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device),
                torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)) for _ in range(8)]
    runner = Runner(model, cfg, device, args.dtype == "bf16", batches, compile=args.compile)

    print(f"machine: {machine(device)}")
    print(f"model: {args.preset} preset{' + GPAS' if args.gpas else ''}, {config.num_layers} layers x "
          f"{config.hidden_size}, {model.num_parameters():,} parameters; batch {batch} x {seq}; {device}, "
          f"{args.dtype}{', compiled' if args.compile else ''}; {args.rounds} timed steps per variant after "
          f"{args.warmup} warm-up rounds")
    with tempfile.TemporaryDirectory() as tmp:
        main = main_floor if args.floor else main_breakdown if args.breakdown else main_schedules
        main(args, runner, model, Path(tmp))


if __name__ == "__main__":
    main()

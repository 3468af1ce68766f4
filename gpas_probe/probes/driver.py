"""Who drives a probe, declared once: :class:`Driver`.

A probe is driven by a user's own loop (:func:`gpas_probe.attach`: the defaults), by our training
loop (:meth:`Driver.for_training`), by the Hugging Face ``Trainer`` callback or by a profile. What
differs is what the driver promises to do and where the probe runs; the statistics read it from the
step's :class:`~gpas_probe.probes.recording.Recording`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpas_probe.distributed import DistContext
from gpas_probe.probes.accumulator import AllReduce


@dataclass(frozen=True)
class Driver:
    """What the caller of a :class:`~gpas_probe.probes.Probe` promises, and the process it runs in.

    - ``grads_at_backward_end``: :meth:`Probe.after_backward` is called after every backward pass,
      before clipping; parameter gradients are then read there with one fused norm instead of a hook
      per parameter (a distributed run always reads them there: DDP/FSDP reduce them only then);
    - ``grad_norm_given``: the global gradient norm comes with :meth:`Probe.end_step`, so the model
      family reads no gradient to compute it;
    - ``all_reduce(sums, maxima)``: reduces the statistics over the ranks of a distributed run
      (:meth:`gpas_probe.distributed.DistContext.all_reduce_stats`);
    - ``grad_scale``: the factor activation-gradient statistics are reported with (``1 / world`` in a
      distributed run: the global loss is the mean of the ranks' losses);
    - ``write``: this process stores rows (False on every rank but the first);
    - ``updates``: an optimizer step follows each recorded step; without one (a profile) no update
      ratio is measured, so the weights are not copied when a step is armed;
    - ``owns_folder``: the caller holds the run folder's lock (:mod:`gpas_probe.lock`) and has set its
      probe table up (a resumed run's rows trimmed), so the probe neither locks nor checks the folder.
    """

    grads_at_backward_end: bool = False
    grad_norm_given: bool = False
    all_reduce: AllReduce | None = None
    grad_scale: float = 1.0
    write: bool = True
    updates: bool = True
    owns_folder: bool = False

    @property
    def reads_grads_at_end(self) -> bool:
        """Parameter gradients are read in :meth:`Probe.after_backward` rather than by hooks."""
        return self.grads_at_backward_end or self.all_reduce is not None

    @classmethod
    def for_profile(cls) -> Driver:
        """The driver a profile is: ``after_backward`` once every batch's backward has run, no optimizer step."""
        return cls(grads_at_backward_end=True, updates=False)

    @classmethod
    def for_training(cls, ctx: DistContext) -> Driver:
        """The driver :func:`gpas_probe.train` is: it calls ``after_backward`` and passes the gradient norm,
        on every rank of ``ctx``."""
        return cls(grads_at_backward_end=True, grad_norm_given=True,
                   all_reduce=ctx.all_reduce_stats if ctx.distributed else None, grad_scale=1 / ctx.world,
                   write=ctx.is_main, owns_folder=True)

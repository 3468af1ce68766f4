"""Per-token reductions of the tensors one pass probes, kept in one preallocated buffer.

A recorded step touches each probed tensor (an activation at a hook point, or its gradient) once, in
its hook: a few passes over it leave, per token, the sum over the hidden dimension, the squared
deviations from the token's mean, and the largest and smallest value (and, for forward tensors when
asked, the two tokens where the largest ``|x|`` of the tensor can sit, with their vectors). Everything
else the statistic families need (sums over the kept tokens, the outlier tokens, the medians they are
found with, intervals, which candidate holds the largest ``|x|`` and in which dimension) is computed
for every tensor of the pass at once from these rows (:meth:`TokenRows.summary`), when the pass ends.

A tensor seen at several sites (``resid_post`` of layer l is ``resid_pre`` of layer l + 1; autograd
hands one gradient object to both terms of an add) gets one row. The rows of one pass share one shape
and one token mask (memory: four floats per token per distinct tensor of one pass, about 90 MB for 32
layers and 32k tokens per pass); a new pass, shape or mask starts new rows
(:class:`~gpas_probe.probes.recording.Recording` hands the full rows to the families first).
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch

from gpas_probe.probes.accumulator import stat_dtype

SUM, DEV_SQ, HI, LO = 0, 1, 2, 3  # the per-token fields of a row: sum, squared deviations, max, min


class Summary(NamedTuple):
    """Per row, over the kept tokens: their number (the same for every row: an int, or a 0-d tensor),
    the sum of squared deviations from each token's mean, the sum of squared token means, and the
    largest ``|x|`` (``-inf`` when no token is kept)."""

    n: int | torch.Tensor
    dev_sq: torch.Tensor
    mean_sq: torch.Tensor
    absmax: torch.Tensor


def masked(t: torch.Tensor, mask: torch.Tensor | None, fill: float = 0.0) -> torch.Tensor:
    """``t`` where ``mask``, else ``fill`` (``t`` itself without a mask); a value left out is gone, even
    an infinite or NaN one."""
    return t if mask is None else torch.where(mask, t, torch.full((), fill, dtype=t.dtype, device=t.device))


def masked_sum(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``t`` (E, N) summed over the positions of ``mask`` (N or E, N; None: all)."""
    return masked(t, mask).sum(-1)


def repeated(value: float | torch.Tensor, e: int, device: torch.device) -> torch.Tensor:
    """``value`` ``e`` times, in float64 (counts stay exact, also summed over passes)."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.float64).expand(e)
    return torch.full((e,), float(value), dtype=torch.float64, device=device)


class PerToken(NamedTuple):
    """Per row and token (each (rows, B*T)): the mean over the hidden dimension, the sum of squared
    deviations from it, the largest ``|x|``, and the mean of ``x²``."""

    mean: torch.Tensor
    dev_sq: torch.Tensor
    absmax: torch.Tensor
    mean_square: torch.Tensor


class TokenRows:
    """One row of per-token reductions for each distinct tensor of a pass (module doc).

    ``like`` is the first tensor (B, T, hidden); ``keep`` the (B, T) positions statistics include
    (None: all); ``capacity`` the rows reserved (more are added by doubling); ``locate``: forward rows
    also keep where their largest ``|x|`` sits (the flat token index and the hidden dimension); ``ids``
    the pass's (B, T) input ids, when known.
    """

    def __init__(self, like: torch.Tensor, keep: torch.Tensor | None, capacity: int, locate: bool,
                 ids: torch.Tensor | None = None) -> None:
        self.batch, self.seq = like.shape[0], like.shape[1]
        self.dtype, self.device = stat_dtype(like), like.device
        self.keep = keep
        self.keep_flat = keep.reshape(-1) if keep is not None else None
        self.locate = locate
        self.ids = ids
        self.data = torch.empty(max(capacity, 1), 4, self.batch * self.seq, dtype=self.dtype, device=self.device)
        # where each located row's largest |x| may sit: the tokens of its largest and smallest value, and
        # those two tokens' vectors (:attr:`loc` picks between them for all rows at once)
        self._candidates = torch.zeros(self.data.shape[0], 2, dtype=torch.long, device=self.device)
        self._candidate_rows: dict[int, torch.Tensor] = {}
        self.pairs: torch.Tensor | None = None  # per-token dot products of tensor pairs (ratios)
        self.n_pairs = 0
        self.n = 0
        self.hidden: list[int] = []
        self.backward_seen = False
        self._seen: dict[int, tuple[weakref.ref, int, int]] = {}
        self.forward: list[bool] = []
        self._summary: Summary | None = None
        self._per_token: PerToken | None = None
        self._medians: torch.Tensor | None = None
        self._loc: torch.Tensor | None = None

    def accepts(self, x: torch.Tensor, keep: torch.Tensor | None) -> bool:
        """Whether ``x`` (with positions ``keep``) belongs with these rows: same shape, dtype, device, mask."""
        return (x.shape[0], x.shape[1]) == (self.batch, self.seq) and stat_dtype(x) == self.dtype \
            and x.device == self.device and keep is self.keep

    def _grow(self) -> None:
        self.data = torch.cat([self.data, torch.empty_like(self.data)])
        self._candidates = torch.cat([self._candidates, torch.zeros_like(self._candidates)])

    def row(self, x: torch.Tensor, scratch: torch.Tensor, forward: bool) -> int:
        """The row of ``x`` (B, T, hidden), reduced now unless this very tensor already has one;
        ``scratch`` is a buffer of ``x``'s shape in the statistics dtype."""
        known = self.known(x)
        if known is not None:
            return known
        if self.n == self.data.shape[0]:
            self._grow()
        r, self.n = self.n, self.n + 1
        xs = self._stat(x)
        h = xs.shape[-1]
        self.hidden.append(h)
        self.forward.append(forward)
        d = self.data[r].view(4, self.batch, self.seq, 1)
        sums = d[SUM]
        torch.sum(xs, -1, keepdim=True, out=sums)
        # two passes (token means, then squared deviations): one would cancel when means are large
        torch.sum(torch.sub(xs, sums, alpha=1 / h, out=scratch).pow_(2), -1, keepdim=True, out=d[DEV_SQ])
        torch.amax(xs, -1, keepdim=True, out=d[HI])
        torch.amin(xs, -1, keepdim=True, out=d[LO])
        if forward and self.locate:
            self._locate(r, xs)
        # A weak reference: holding a gradient would stop autograd from accumulating into it in place.
        # When it does, the same object carries new values: its version counter tells.
        self._seen[id(x)] = (weakref.ref(x), x._version, r)
        self._summary = self._per_token = self._medians = self._loc = None
        return r

    def known(self, x: torch.Tensor) -> int | None:
        """The row of this very tensor, unless it has none or has changed in place since."""
        found = self._seen.get(id(x))
        return found[2] if found is not None and found[0]() is x and found[1] == x._version else None

    def _stat(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        return x if x.dtype == self.dtype else x.to(self.dtype)

    def _locate(self, r: int, xs: torch.Tensor) -> None:
        """Keep the two tokens where the largest ``|x|`` of a kept token of ``xs`` can sit (its largest
        value's and its smallest's) and their vectors; no host sync."""
        d, tokens = self.data[r], self._candidates[r]
        torch.argmax(masked(d[HI], self.keep_flat, -math.inf), out=tokens[0])
        torch.argmin(masked(d[LO], self.keep_flat, math.inf), out=tokens[1])
        self._candidate_rows[r] = xs.reshape(-1, xs.shape[-1]).index_select(0, tokens)

    @property
    def loc(self) -> torch.Tensor:
        """Per row (n, 2): the flat token index and the hidden dimension of the largest ``|x|`` of a kept
        token, the first of equals (zeros for rows not located); for all located rows at once."""
        if self._loc is None:
            self._loc = torch.zeros(self.n, 2, dtype=torch.long, device=self.device)
            by_hidden: dict[int, list[int]] = {}
            for r in self._candidate_rows:
                by_hidden.setdefault(self.hidden[r], []).append(r)
            for group in by_hidden.values():
                at = self.index(group)
                hi_token, lo_token = self._candidates.index_select(0, at).unbind(-1)
                hi, lo = self.data[at, HI, hi_token], self.data[at, LO, lo_token].neg()
                use_hi = (hi > lo) | ((hi == lo) & (hi_token <= lo_token))  # ties: the first token
                vectors = torch.stack([self._candidate_rows[r] for r in group])  # (E, 2, hidden)
                chosen = torch.where(use_hi[:, None], vectors[:, 0], vectors[:, 1])
                self._loc[at] = torch.stack([torch.where(use_hi, hi_token, lo_token), chosen.abs().argmax(-1)], -1)
        return self._loc

    def pair(self, a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> int:
        """The per-token dot products of ``a`` and ``b`` (B, T, hidden) in a pair row; its index."""
        if self.pairs is None:
            self.pairs = torch.empty(self.data.shape[0], self.batch * self.seq, dtype=self.dtype, device=self.device)
        if self.n_pairs == self.pairs.shape[0]:
            self.pairs = torch.cat([self.pairs, torch.empty_like(self.pairs)])
        p, self.n_pairs = self.n_pairs, self.n_pairs + 1
        torch.sum(torch.mul(self._stat(a), self._stat(b), out=scratch), -1,
                  out=self.pairs[p].view(self.batch, self.seq))
        return p

    # -- reductions over the kept tokens, for every row at once ----------------------------------
    def hidden_of(self, rows: list[int]) -> torch.Tensor | float:
        """The hidden size of each row (a float when all are the same)."""
        sizes = {self.hidden[r] for r in rows}
        if len(sizes) == 1:
            return float(sizes.pop())
        return torch.tensor([float(self.hidden[r]) for r in rows], dtype=self.dtype, device=self.device)[:, None]

    def kept_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (E, B*T) summed over the kept tokens: (E,)."""
        return masked_sum(t, self.keep_flat)

    def kept_max(self, t: torch.Tensor) -> torch.Tensor:
        """The largest value of ``t`` (E, B*T) over the kept tokens (``-inf`` when none is)."""
        return masked(t, self.keep_flat, -math.inf).amax(-1)

    def count(self) -> int | torch.Tensor:
        return self.batch * self.seq if self.keep_flat is None else self.keep_flat.sum()

    def counts(self, e: int) -> torch.Tensor:
        """The number of kept tokens, ``e`` times (:func:`repeated`)."""
        return repeated(self.count(), e, self.device)

    def index(self, rows: list[int]) -> torch.Tensor:
        """``rows`` as an index tensor on the rows' device (for ``index_select`` on what follows)."""
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def per_token(self) -> PerToken:
        """:class:`PerToken` of every row (computed once)."""
        if self._per_token is None:
            d = self.data[:self.n]
            h = self.hidden_of(list(range(self.n)))
            mean = d[:, SUM] / h
            self._per_token = PerToken(mean, d[:, DEV_SQ], torch.maximum(d[:, HI], d[:, LO].neg()),
                                       d[:, DEV_SQ] / h + mean.square())
        return self._per_token

    def summary(self) -> Summary:
        """:class:`Summary` of every row (computed once)."""
        if self._summary is None:
            t = self.per_token()
            self._summary = Summary(self.count(), self.kept_sum(t.dev_sq), self.kept_sum(t.mean.square()),
                                    self.kept_max(t.absmax))
        return self._summary

    def medians(self) -> torch.Tensor:
        """Per row, the median over the kept tokens of the token mean square (the lower middle value for an
        even count); computed once, for forward rows only (NaN for the others)."""
        if self._medians is None:
            forward = [r for r in range(self.n) if self.forward[r]]
            self._medians = torch.full((self.n,), math.nan, dtype=self.dtype, device=self.device)
            if forward:
                ms = self.per_token().mean_square.index_select(0, self.index(forward))
                self._medians[forward] = masked(ms, self.keep_flat, math.nan).nanmedian(-1).values
        return self._medians

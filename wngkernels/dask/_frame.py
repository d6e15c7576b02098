r"""The first pass, over the samples only: the centre, the scale, the bandwidth and the basis points.

The core centres the samples and measures them in bandwidths before anything else
(:func:`wngkernels.estimator._in_bandwidth_units`): :math:`\hat x = ((x - \bar x)/c)\, s` with
``c`` a power of two near :math:`\max|x - \bar x|` and ``s = c/ℓ``. On a chunked array that
needs, before the pass over the Jacobian, the global mean :math:`\bar x`, the largest deviation
from it, the bandwidth rule's statistics and the basis points :math:`Y_m = X_{i_m}`. Each block
gives its count, mean, sum of squared deviations, column extremes and a finiteness flag; blocks
merge ``SPLIT_EVERY`` at a time in a tree in the graph (Chan's update: no cancellation, whatever
the offset of the data). One ``dask.compute`` brings back that one merged record, the basis points, the
rows the median heuristic reads and any small Dask arguments (``grad``, ``damping``).

The largest deviation is exact: ``fl(x − x̄)`` is monotone in ``x``, so its largest value over
the samples is ``fl(max x − x̄)`` per coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import dask
import numpy as np

from .. import _backend
from ..bandwidth import AuthorsRule, MedianHeuristic
from ..estimator import EXPANSION_RADIUS, _check_kernel_basis, _Context, _unit_factors
from ..kernels import Kernel, coordinate_onehot
from ..nystrom import NystromBasis
from ._inputs import XP, Inputs

#: Partial results merged per node of the reduction trees.
SPLIT_EVERY = 8


def tree(parts: list, merge) -> Any:
    """One ``Delayed``: ``parts`` merged ``SPLIT_EVERY`` at a time, level by level."""
    while len(parts) > 1:
        parts = [dask.delayed(merge, pure=True)(*parts[i:i + SPLIT_EVERY])
                 for i in range(0, len(parts), SPLIT_EVERY)]
    return parts[0]


@dataclass(frozen=True)
class _Stats:
    """One block's (or several merged blocks') statistics; means and squares in units of ``scale``."""

    n: int
    finite: bool
    scale: float = 1.0  # a power of two near the largest |x| (1 if all are 0)
    mean: Any = None  # (d,) float64: the mean of x / scale
    m2: float = 0.0  # Σ ‖x/scale − mean‖²
    high: Any = None  # (d,) column maxima, work dtype
    low: Any = None  # (d,) column minima


def _block_stats(x, work) -> _Stats:
    x = np.asarray(x).astype(work, copy=False)
    if not bool(np.all(np.isfinite(x))):
        return _Stats(x.shape[0], False)
    if x.shape[0] == 0:  # an empty chunk: nothing to merge
        return _Stats(0, True)
    big = float(np.max(np.abs(x)))
    scale = _backend.pow2_below(big) if big > 0 else 1.0
    xs = x.astype(np.float64) / scale
    mean = np.mean(xs, axis=0)
    r = xs - mean
    return _Stats(x.shape[0], True, scale, mean, float(np.sum(r * r)), np.max(x, axis=0), np.min(x, axis=0))


def _merge_stats(*parts: _Stats) -> _Stats:
    if not all(p.finite for p in parts):
        return _Stats(sum(p.n for p in parts), False)
    parts = [p for p in parts if p.n > 0]
    if not parts:
        return _Stats(0, True)
    scale = max(p.scale for p in parts)
    acc = None
    for p in parts:  # rescaling by powers of two is exact
        r = p.scale / scale
        mean, m2 = p.mean * r, p.m2 * r * r
        if acc is None:
            acc = (p.n, mean, m2, p.high, p.low)
            continue
        n, m, s, hi, lo = acc
        delta = mean - m
        total = n + p.n
        acc = (total, m + delta * (p.n / total), s + m2 + float(delta @ delta) * (n * p.n / total),
               np.maximum(hi, p.high), np.minimum(lo, p.low))
    n, mean, m2, high, low = acc
    return _Stats(n, True, scale, mean, m2, high, low)


@dataclass(frozen=True)
class Frame:
    """What every block needs (picklable, sent once to the workers): the centre and units of the
    samples, the basis points in those units, the resolved kernel and the chunking."""

    center: Any  # (d,) work dtype
    scale: float
    spread: float
    points: Any  # (M, d) in bandwidth units
    onehot: Any  # (M, d)
    kernel: Kernel  # bandwidth resolved
    out: Any
    chunk_size: int | None

    def units(self, x):
        """``((x − x̄)/c)·s``, the core's arithmetic (:func:`~wngkernels.estimator._in_bandwidth_units`)."""
        dev = np.asarray(x).astype(self.center.dtype, copy=False) - self.center
        return dev if self.scale == 1 and self.spread == 1 else (dev / self.scale) * self.spread

    def context(self, x_hat) -> _Context:
        """The core's context over the samples ``x_hat`` (bandwidth units). ``C Cᵀ`` is taken from
        the rows where these samples reach beyond the expansion's radius (the core's criterion,
        applied per block)."""
        with _backend.ignore_overflow():
            direct = float(np.max(np.sum(x_hat * x_hat, axis=1))) > EXPANSION_RADIUS**2
        return _Context(XP, x_hat, self.points, self.onehot, self.kernel, self.out, direct)

    def host(self) -> _Context:
        """A context for the ``M × M`` steps (``K``, the units of the results): its samples are the
        basis points, which those steps never read."""
        return _Context(XP, self.points, self.points, self.onehot, self.kernel, self.out, False)


def _check_rule(kernel: Kernel) -> None:
    rule = kernel.bandwidth
    if callable(rule) and not isinstance(rule, (AuthorsRule, MedianHeuristic)):
        raise TypeError(
            f"kernel's bandwidth rule {type(rule).__name__} is not supported on Dask arrays (it would "
            "need all samples in memory): use a float, AuthorsRule or MedianHeuristic"
        )


def first_pass(args: Inputs, kernel: Kernel, basis: NystromBasis, chunk_size, extra=()):
    """The one compute over the samples. Returns the :class:`Frame`, the ``(q,)`` vector (NumPy, in
    the work dtype, checked finite) and ``extra`` computed (Dask arrays among them become NumPy)."""
    _check_kernel_basis(kernel, basis)
    _check_rule(kernel)
    n, d = args.shape
    basis.check(n, d)
    if chunk_size is not None:
        chunk_size = _backend.check_int(chunk_size, "chunk_size", minimum=1)
    samples = args.samples
    blocks = samples.to_delayed(optimize_graph=False).ravel()
    stats = tree([dask.delayed(_block_stats, pure=True)(b, args.work) for b in blocks], _merge_stats)
    median = isinstance(kernel.bandwidth, MedianHeuristic)
    rows = {"points": basis.indices, "head": np.arange(min(kernel.bandwidth.max_points, n) if median else 0)}
    picks = {k: _picks(blocks, samples.chunks[0], r) for k, r in rows.items()}
    stats, got, vector, extra = dask.compute(stats, {k: [p for _, p in v] for k, v in picks.items()},
                                             args.vector, list(extra))
    if not stats.finite:
        raise ValueError("samples must be finite; it contains NaN or Inf")
    y, head = (_assemble(picks[k], got[k], len(rows[k]), d, args.work) for k in ("points", "head"))
    if vector is not None:
        vector = vector.astype(args.work, copy=False)
        _backend.require_finite(XP, vector, args.vector_name)
    return _frame(args, kernel, basis, chunk_size, stats, y, head), vector, extra


def _picks(blocks, chunks, rows) -> list:
    """``[(where, Delayed)]``: the ``rows`` (global indices) that each block holds, read from the
    block's own task (a block is evaluated once per compute, however many readers it has)."""
    parts, lo = [], 0
    for block, size in zip(blocks, chunks, strict=True):
        where = np.flatnonzero((rows >= lo) & (rows < lo + size))
        if where.size:
            parts.append((where, dask.delayed(_take, pure=True)(block, rows[where] - lo)))
        lo += size
    return parts


def _take(x, local):
    return np.asarray(x)[local]


def _assemble(parts, got, count: int, d: int, work):
    out = np.empty((count, d), dtype=work)
    for (where, _), rows in zip(parts, got, strict=True):
        out[where] = rows
    return out


def _frame(args: Inputs, kernel, basis, chunk_size, stats: _Stats, y, head) -> Frame:
    work = args.work
    rule = kernel.bandwidth
    if isinstance(rule, AuthorsRule):  # the rule's normalisation: c = pow2(max |x|) >= max |y|
        dy = y.astype(np.float64) / stats.scale - stats.mean
        kernel = kernel.with_bandwidth(
            rule.from_mean_square(float(np.mean(np.sum(dy * dy, axis=1))) + stats.m2 / stats.n,
                                  scale=stats.scale))
    elif isinstance(rule, MedianHeuristic):  # reads the first max_points rows only
        kernel = kernel.resolve(y, head.astype(work, copy=False))
    ell = kernel.bandwidth
    center = np.asarray(stats.mean * stats.scale).astype(work)
    with _backend.ignore_overflow():  # an overflow is refused by _unit_factors
        top = float(np.max(np.maximum(stats.high - center, center - stats.low)))
    scale, spread = _unit_factors(XP, top, ell, work)
    onehot = coordinate_onehot(XP, basis.dims, basis.num_basis, args.shape[1], y)
    frame = Frame(center, scale, spread, None, onehot, kernel, args.out, chunk_size)
    return replace(frame, points=frame.units(y))  # the basis points in the samples' units

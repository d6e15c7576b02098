r"""The pass over the Jacobian: per block, the core's sums; merged in a tree; one ``dask.compute``.

Each block of ``n_b`` samples (and its ``(n_b, d, q)`` slice of the Jacobian) gives
:math:`\sum_n \hat H_n\hat H_n^\top` ``(M, M)`` and :math:`\sum_{n,i}\hat H_n[:, i]\,J_{n,i,:}`
``(M, q)`` through the core's :func:`~wngkernels.estimator._sums` (which itself goes through the
block in chunks of ``chunk_size`` samples), in units of the bandwidth, and whether its slice of
the Jacobian is finite. Partial sums merge ``SPLIT_EVERY`` at a time in the graph, so the client
receives one ``(M, M)`` and one ``(M, q)`` matrix whatever the number of blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask
import numpy as np

from ..estimator import _means, _sums
from ._frame import Frame, tree
from ._inputs import Inputs


@dataclass(frozen=True)
class _Sums:
    cc: Any  # (M, M), or None where a slice of the Jacobian is not finite
    t: Any  # (M, q), or None without a Jacobian
    finite: bool


def _block_sums(frame: Frame, x, jac=None) -> _Sums:
    m = frame.points.shape[0]
    if np.shape(x)[0] == 0:  # an empty chunk
        t = None if jac is None else np.zeros((m, np.shape(jac)[2]), dtype=frame.center.dtype)
        return _Sums(np.zeros((m, m), dtype=frame.center.dtype), t, True)
    if jac is not None:
        jac = np.asarray(jac).astype(frame.center.dtype, copy=False)
        if not bool(np.all(np.isfinite(jac))):
            return _Sums(None, None, False)
    cc, t = _sums(frame.context(frame.units(x)), jac, frame.chunk_size)
    return _Sums(cc, t, True)


def _merge_sums(*parts: _Sums) -> _Sums:
    if not all(p.finite for p in parts):
        return _Sums(None, None, False)
    cc, t = parts[0].cc, parts[0].t
    for p in parts[1:]:
        cc = cc + p.cc
        t = None if t is None else t + p.t
    return _Sums(cc, t, True)


def means(frame: Frame, args: Inputs, with_jacobian: bool):
    """``(Ĉ Ĉᵀ, T̂)`` over all samples (``T̂`` ``None`` without the Jacobian), as the core's
    :func:`~wngkernels.estimator._accumulate` returns them: one ``dask.compute``."""
    shared = dask.delayed(frame, traverse=False)  # one key: sent once to each worker
    xs = args.samples.to_delayed(optimize_graph=False).ravel()
    if with_jacobian:
        js = args.jacobian.to_delayed(optimize_graph=False).ravel()
        parts = [dask.delayed(_block_sums, pure=True)(shared, x, j) for x, j in zip(xs, js, strict=True)]
    else:
        parts = [dask.delayed(_block_sums, pure=True)(shared, x) for x in xs]
    (total,) = dask.compute(tree(parts, _merge_sums))
    if not total.finite:
        raise ValueError("jacobian must be finite; it contains NaN or Inf")
    return _means(total.cc, total.t, args.shape[0])

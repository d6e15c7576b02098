"""A refresh's first device work — basis points, one-hot, the bandwidth left on the device, the
kernel rows and ``Σ_n H_n H_nᵀ`` — replayed from a CUDA graph.

These are some fifty small operations between the forward pass and the batched backward, when the
GPU waits for the host: launched one by one they cost about 2 ms of host time on an H100 machine,
replayed from a graph about 0.3 ms (``docs/benchmarks.md``). The graph runs the same kernels on
the same inputs, so its numbers are the eager ones bit for bit.
"""

from __future__ import annotations

import math

import torch
from array_api_compat import array_namespace

from ..estimator import _gram_of_rows
from ..kernels import Kernel

#: Graphs kept per preconditioner (one per shape, dtype, device, kernel and autocast state: a short
#: last batch adds one); the least recently captured goes first.
MAX_GRAPHS = 4


def first_rows(kernel: Kernel, xd: torch.Tensor, pairs: torch.Tensor):
    """``(points, onehot, ell, rows, cc)`` of one micro-batch ``xd`` ``(N, d)`` and the basis pairs
    ``pairs`` ``(2M,)`` (indices, then dims) on ``xd``'s device, reading nothing back: ``ell`` the
    :meth:`~wngkernels.AuthorsRule.deferred` bandwidth (``None`` for a fixed one), ``rows`` the kernel's
    rows ``(M, N, d)`` (NaN where an output is not finite: the refresh is then dropped), ``cc`` their
    ``(M, M)`` Gram matrix ``Σ_n H_n H_nᵀ``."""
    m = pairs.shape[0] // 2
    points = xd.index_select(0, pairs[:m])
    onehot = (pairs[m:, None] == torch.arange(xd.shape[1], device=xd.device)).to(xd.dtype)  # E (M, d)
    rule = kernel.bandwidth
    ell = rule.deferred(points, xd) if callable(rule) else None
    rows = kernel_rows(kernel, points, onehot, xd, ell)
    return points, onehot, ell, rows, _gram_of_rows(array_namespace(xd), rows)


def kernel_rows(kernel: Kernel, points, onehot, xd: torch.Tensor, ell) -> torch.Tensor:
    """The kernel's rows ``(M, N, d)`` of a micro-batch, reading nothing back: the points are rows of
    the first micro-batch and the one-hot was built from our dims, so nothing is re-validated.
    Non-finite outputs (in any micro-batch) make every row NaN, so that ``C Cᵀ`` is not finite and
    the refresh is dropped after the step's read, with no read here."""
    xp = array_namespace(xd)
    if ell is None:
        rows = kernel._rows_unchecked(xp, points, onehot, xd, kernel.bandwidth, xd.dtype)
    else:
        rows = kernel._rows_deferred(xp, points, onehot, xd, ell, xd.dtype)
    return torch.where(torch.isfinite(xd).all(), rows, math.nan)


class RowGraphs:
    """:func:`first_rows` captured once per shape, dtype, device, kernel and autocast state, then
    replayed.

    A capture that fails (an operation CUDA graphs do not allow) leaves that key to the eager
    :func:`first_rows` for good. The outputs that outlive the call (points, one-hot, ``ell``,
    ``cc``) are copied out of the graph's buffers; ``rows`` is the graph's own buffer, valid until the
    next replay (the capture consumes it at once: the whitening and the batched backward).
    """

    def __init__(self):
        self._graphs: dict = {}

    def __deepcopy__(self, memo) -> RowGraphs:
        return RowGraphs()  # a copy captures its own graphs (they hold the original's buffers)

    def __call__(self, kernel: Kernel, xd: torch.Tensor, pairs: torch.Tensor):
        """:func:`first_rows` for ``pairs`` ``(2M,)`` (indices, then dims) on ``xd``'s CUDA device."""
        m = pairs.shape[0] // 2
        # under autocast the captured products take its dtype: a graph per autocast state
        key = (tuple(xd.shape), xd.dtype, xd.device, m, id(kernel), _autocast_state())
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(kernel, xd, pairs)
            if len(self._graphs) >= MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = entry
        if entry[0] is None:  # not capturable: eager
            return first_rows(kernel, xd, pairs)
        graph, static_xd, static_pairs, outs, _ = entry
        static_xd.copy_(xd)
        static_pairs.copy_(pairs)
        graph.replay()
        points, onehot, ell, rows, cc = outs
        return points.clone(), onehot.clone(), None if ell is None else ell.clone(), rows, cc.clone()

    @staticmethod
    def _capture(kernel: Kernel, xd: torch.Tensor, pairs: torch.Tensor):
        """``(graph, static xd, static pairs, static outputs, kernel)``, or ``(None, ..., kernel)``
        where the capture fails (the kernel is held so that its ``id`` in the key stays its own)."""
        static_xd, static_pairs = xd.clone(), pairs.clone()
        try:
            side = torch.cuda.Stream(device=xd.device)
            side.wait_stream(torch.cuda.current_stream(xd.device))
            with torch.cuda.stream(side):  # warm-up off the graph (workspaces, cuBLAS handles)
                first_rows(kernel, static_xd, static_pairs)
            torch.cuda.current_stream(xd.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = first_rows(kernel, static_xd, static_pairs)
        except Exception:  # noqa: BLE001 - any failure to capture leaves the eager path
            return None, None, None, None, kernel
        return graph, static_xd, static_pairs, outs, kernel


def _autocast_state() -> tuple:
    """Whether CUDA autocast is on, and its dtype (torch before 2.4 names them without a device)."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()

"""The ``sync_free`` step after ``g``: the ratio rule, the solve, the fallback, the clipping, the
half-precision fit and the bookkeeping (:func:`step_tail`), replayed from a CUDA graph on CUDA.

Some hundred small operations on a few scalars and a few passes over ``q`` numbers: launched one by
one they cost the host several milliseconds per step, more than the GPU takes to run them, so a
step between refreshes (``refresh_every > 1``) would be bound by the host. Replayed from a graph
they cost one launch and a few copies into its inputs; the numbers are the eager ones bit for bit
(the same kernels on the same inputs).
"""

from __future__ import annotations

import torch
from array_api_compat import array_namespace

from ._direction import decided_direction
from ._syncfree import CholeskySolver, DeviceState

#: Graphs kept per preconditioner (one per key: shapes, dtypes and the step's options).
MAX_TAILS = 4


def step_tail(g: torch.Tensor, loss_now: torch.Tensor | None, scal, solver: CholeskySolver | None,
              state: DeviceState, *, adapt: bool, clip_on: bool, limit: float | None, factor: float,
              bounds: tuple[float, float], window: int) -> torch.Tensor:
    """The direction to write ``(q,)`` for ``g`` ``(q,)``, deciding everything on the device; ``state``
    is updated in place.

    Parameters
    ----------
    g : Tensor, shape (q,)
    loss_now : Tensor or None
        The step's loss (0-d), for the ratio rule.
    scal : sequence of 3 floats or 0-d tensors
        The schedule's ``ε``, the learning rate (NaN: none) and ``clip_norm``.
    solver : CholeskySolver or None
        ``None``: no cache, ``g`` is written (a fallback).
    state : DeviceState
    adapt : bool
        Run the ratio rule (``adaptive_eps`` and a loss).
    clip_on : bool
        Clip to ``scal[2]``.
    limit : float or None
        The narrowest ``.grad`` dtype's largest number where it is below the direction's.
    factor, bounds, window
        The rule's ``eps_factor``, ``eps_bounds`` and ``window``.

    Returns
    -------
    Tensor, shape (q,)
        ``w`` (or ``g`` where ``w`` fails), clipped; zeros where ``g`` is not finite.
    """
    base, lr, clip = scal
    g_ok = torch.isfinite(g).all()
    if adapt:
        state.observe(loss_now, g_ok, base, factor, bounds, window)
    w = None if solver is None else solver._solve(array_namespace(g), g, state.eps(base, bounds), False)
    out, stats = decided_direction(g if w is None else w, g, clip if clip_on else None)
    fell, gw = (torch.ones_like(stats[0]) if w is None else stats[0]), stats[1]
    if limit is not None:  # too long for a half-precision .grad: g
        long = torch.amax(torch.abs(out)) > limit
        g_out, g_stats = decided_direction(g, g, clip if clip_on else None)
        out, fell, gw = (torch.where(long, g_out, out), torch.where(long, 1.0, fell),
                         torch.where(long, g_stats[1], gw))
    state.record(loss_now, gw, lr, g_ok, fell)
    return torch.where(g_ok, out, 0.0)


class TailGraphs:
    """:func:`step_tail` captured for a cached solver and replayed at the steps that reuse it (CUDA).

    The graph reads fixed buffers: ``g`` and the loss are copied into them, the host's three
    numbers too (only when they change, from pinned memory without blocking), and the
    :class:`DeviceState` vector is the graph's own (a state rebuilt after a read is copied into
    it). The solver's tensors are read where they are: a new solver (the next refresh, or the
    unseen-parameter rule settled) is captured anew at its first reuse, with the capture calls
    themselves (``torch.cuda.graph`` would wait for the device and empty the allocator's cache each
    time). A capture that fails leaves that key to the eager :func:`step_tail` for good.
    """

    def __init__(self):
        self._entries: dict = {}

    def __deepcopy__(self, memo) -> TailGraphs:
        return TailGraphs()

    def __call__(self, g, loss_now, scal: tuple[float, float, float], solver: CholeskySolver,
                 state: DeviceState, **options) -> torch.Tensor:
        """:func:`step_tail`'s direction, replayed (captured first where ``solver`` is new here)."""
        key = (tuple(g.shape), g.dtype, g.device, loss_now is not None, tuple(sorted(options.items())))
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= MAX_TAILS:
                self._entries.pop(next(iter(self._entries)))
            entry = self._entries[key] = _Entry(g, loss_now, solver, state, options)
        if entry.usable and entry.solver is not solver:
            entry.capture(solver)
        if not entry.usable:
            return step_tail(g, loss_now, scal, solver, state, **options)
        return entry.replay(g, loss_now, scal, state)


class _Entry:
    """The input buffers of one key's :func:`step_tail` graph, and the graph of its current solver."""

    def __init__(self, g, loss_now, solver: CholeskySolver, state: DeviceState, options):
        dev = g.device
        self.options, self.solver, self.graph, self.out, self.uploaded = options, None, None, None, None
        self.g = g.clone()
        self.loss = None if loss_now is None else loss_now.clone()
        self.scal = torch.zeros(3, dtype=torch.float64, device=dev)
        self.values = state.values.clone()
        self.stream = torch.cuda.Stream(device=dev)
        self.usable = True
        try:  # warm-up off the graph (cuBLAS and cuSOLVER workspaces), on a copy of the state
            self.stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(self.stream):
                scratch = DeviceState.wrapping(self.values.clone())
                step_tail(self.g, self.loss, tuple(self.scal), solver, scratch, **options)
            torch.cuda.current_stream(dev).wait_stream(self.stream)
        except Exception:  # noqa: BLE001 - the eager path for good
            self.usable = False

    def capture(self, solver: CholeskySolver) -> None:
        """A graph of :func:`step_tail` with ``solver`` (the previous one, and its memory, freed first)."""
        self.graph = self.out = self.solver = None
        graph, shell = torch.cuda.CUDAGraph(), DeviceState.wrapping(self.values)
        try:
            with torch.cuda.stream(self.stream):
                graph.capture_begin()
                try:
                    out = step_tail(self.g, self.loss, tuple(self.scal), solver, shell, **self.options)
                finally:
                    graph.capture_end()
        except Exception:  # noqa: BLE001 - any failure to capture leaves the eager path
            self.usable = False
            return
        self.graph, self.out, self.solver = graph, out, solver

    def replay(self, g, loss_now, scal, state: DeviceState) -> torch.Tensor:
        """Copy the inputs in, replay, and return the graph's direction buffer."""
        self.g.copy_(g)
        if loss_now is not None:
            self.loss.copy_(loss_now)
        if scal != self.uploaded:  # from pinned memory, without blocking (pageable copies wait)
            self.scal.copy_(torch.tensor(scal, dtype=torch.float64).pin_memory(), non_blocking=True)
            self.uploaded = scal
        if state.values is not self.values:  # a state rebuilt after a read
            self.values.copy_(state.values)
            state.values = self.values
        self.graph.replay()
        return self.out

r"""``KWNG``: the kernelized Wasserstein natural gradient as a PyTorch preconditioner.

A preconditioner, not an optimizer: it rewrites each parameter's
``.grad`` with the KWNG direction :math:`w = (\hat G + \varepsilon D^{-1})^{-1} g` and any
``torch.optim`` optimizer steps as usual. Per step (the PyTorch page of the documentation):

1. ``capture(outputs)``: draw ``M`` basis pairs from the batch (torch's default generator
   unless ``generator`` is given), resolve the bandwidth rule (on the device, without a read, for
   :class:`~wngkernels.AuthorsRule` in a single process), form the cotangents and accumulate
   :math:`\sum_n H_nH_n^\top` (for :math:`CC^\top`) and :math:`T` from one batched backward
   (on CUDA the device work before that backward is replayed from a graph: ``cuda_graphs``).
   Where :math:`CC^\top` is complete before that backward (one micro-batch per step, a single
   process, no grad scaler, outputs in float32 or wider) the cotangents are whitened first
   (:func:`~wngkernels.whiten`'s ``M × M`` factor applied to them: :math:`T` is linear in its
   cotangents), so the backward gives :math:`\tilde T` itself;
2. the user's ``loss.backward()`` fills ``.grad`` with ``g`` (so DDP, AMP and accumulation keep
   working as they do without KWNG);
3. ``step()``: :func:`~wngkernels.whiten` where the capture did not (ridgeless when ``lam = 0``),
   :func:`~wngkernels.damping_from_whitened` (``D = diag(Ĝ)^{-1/2}``, the authors' guard;
   parameters the outputs do not see are excluded and take the rule of
   :class:`~wngkernels.WhitenedSolver`),
   :func:`~wngkernels.solve_whitened`; fall back to ``g`` where ``⟨g, w⟩ ≤ 0`` or anything is
   non-finite; clip to ``clip_norm``; write ``.grad``; adapt ``ε``.

``precondition(outputs, loss)`` is the three steps in one call.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch

from .._backend import check_int, check_positive_scalar
from ..bandwidth import AuthorsRule
from ..kernels import Gaussian, Kernel
from ..nystrom import NystromBasis
from ..solve import DAMPING_FLOOR
from . import _checkpoint
from ._batched import _check_loss, _work_dtype
from ._capture import _Capture
from ._direction import (
    _copy_all,
    cached_direction,
    decided_direction,
    fits,
    grad_limit,
    refreshed,
    refreshed_sync_free,
    sync_free_solver,
)
from ._dist import Comm, reduce_step
from ._graphs import RowGraphs
from ._options import Schedule, _check_schedule, _collect_params
from ._state import _Draws, _Pending, _Ratio, _Reduced, _Refresh, with_device_bandwidth
from ._syncfree import DeviceState
from ._tail import TailGraphs, step_tail

__all__ = ["KWNG"]


class KWNG(_Capture):
    r"""Kernelized Wasserstein natural gradient preconditioner for any ``torch.optim`` optimizer.

    Rewrites ``p.grad`` with the KWNG direction :math:`w = (\hat G + \varepsilon D^{-1})^{-1} g`
    (the mathematics page, "The kernelized estimator"), where
    :math:`\hat G = T^\top (CC^\top + \lambda K)^\dagger T` is estimated from the model's outputs
    on the batch. Hook-free: any differentiable model works.

    Every option after ``params`` is keyword-only.

    Parameters
    ----------
    params : iterable of Tensor or of dict
        As for ``torch.optim`` (``model.parameters()`` or parameter groups; only the groups'
        ``"params"`` are read: the direction is one joint solve over all of them). Parameters
        with ``requires_grad=False`` and those whose ``.grad`` stays ``None`` are left alone.
    num_basis : int
        ``M``, Nyström basis pairs drawn afresh at each refresh (paper: 5); a batch with fewer
        pairs ``N·d`` (a short last batch) uses them all (``num_short_batches`` counts it).
    eps : float or callable
        Damping :math:`\varepsilon > 0`, or a schedule ``eps(step)``. With ``adaptive_eps`` it is
        multiplied by the adapted factor.
    lam : float or callable
        RKHS regularisation :math:`\lambda \ge 0`; ``0`` is the ridgeless, whitened form.
    damping : {"jacobian", "identity"}
        ``D = diag(Ĝ)^{-1/2}`` (the authors' choice) or ``I``.
    damping_floor : float
        The guard of ``damping="jacobian"``: ``D_jj = 1/(‖T̃_j‖ + damping_floor)``, absolute, the
        authors' ``1e-8`` (:func:`~wngkernels.damping_from_whitened`). Parameters whose column
        of ``T̃`` is zero (the outputs do not depend on them: an auxiliary head, a learned loss
        weight) are excluded from the solve and take the gradient step at the rest's gain, at
        most half the step (:class:`~wngkernels.WhitenedSolver`).
    kernel : wngkernels.Kernel, optional
        Default ``Gaussian(AuthorsRule())``. A bandwidth rule is evaluated at each refresh on
        (basis points, outputs).
    adaptive_eps : bool
        The reduction-ratio rule: :math:`r = 2(L_{prev} - L_{now})/(lr\,\langle g_{prev},
        w_{prev}\rangle)`; at the end of each ``window`` of ratios, ``ε ← ε/eps_factor`` if
        ``max r < 0.25`` and ``ε ← eps_factor·ε`` if ``max r > 0.75``. Needs the loss
        (``precondition``, or ``capture(outputs, loss)``) and the learning rate.
    eps_bounds : (float, float)
        ``ε`` stays in ``[low, high]``.
    eps_factor : float
        In ``(0, 1)``.
    window : int
        Ratios per adaptation.
    clip_norm : float, callable or None
        ``w`` is scaled down to this Euclidean norm if longer (``None``: no clipping).
    refresh_every : int
        Recompute ``T̃`` and ``D`` every ``k`` steps and reuse them in between, computing only
        ``g`` (no basis draw, no batched backward) on the other steps.
    generator : None, int, numpy.random.Generator or torch.Generator
        Source of the basis draws. ``None``: torch's default CPU generator, so the draws follow
        ``torch.manual_seed`` (as dropout and ``DataLoader`` shuffling do) and are the same on
        every device; its state is the caller's to checkpoint (``torch.get_rng_state()``). An
        int seeds a private NumPy generator; a generator is used as given. Private generators
        are saved in :meth:`state_dict`.
    lr : float, callable or None
        Learning rate for the reduction ratio; default: read from ``optimizer.param_groups[0]``.
    optimizer : torch.optim.Optimizer, optional
        Source of the learning rate, and the optimizer ``grad_scaler.unscale_`` is called for.
    grad_scaler : torch.amp.GradScaler, optional
        Mixed precision: ``step`` unscales the gradients (``grad_scaler.unscale_(optimizer)``)
        before reading them; a step with non-finite gradients, which the scaler will skip,
        leaves ``.grad`` and every piece of KWNG state untouched (``num_skipped`` counts it).
    accumulation_steps : int
        ``k`` micro-batches per step: ``capture`` ``k`` times (with a ``backward`` after each),
        then ``step`` writes the direction of the concatenated batch. The basis and bandwidth
        come from the first micro-batch.
    vjp_mode : {"auto", "batched", "loop"}
        How ``T`` is computed (:func:`~wngkernels.torch.jacobian_vjp_rows`).
    distributed : bool or None
        ``None``: use ``torch.distributed`` when it is initialised; ``False``: never.
    process_group : ProcessGroup, optional
    cuda_graphs : bool
        Replay a refresh's first device work (basis points, the bandwidth rule, the kernel rows and
        ``Σ_n H_n H_nᵀ``) from a CUDA graph, captured once per shape: about 2 ms less host time per
        refresh on an H100 machine, the same numbers bit for bit. Used where the outputs are on a
        CUDA device, in one process, with one micro-batch per step and the
        :class:`~wngkernels.AuthorsRule` or a fixed bandwidth; ``False`` launches the operations one by one.
        With ``sync_free``, the steps that reuse a cached solver (``refresh_every > 1``) also replay
        everything after ``g`` from a graph (captured anew at the first reuse of each refresh).
    sync_free : bool
        A step that never reads the device, so that the host is never made to wait for the GPU
        (0.71–0.78× the time of the authors' recipe on the seed's ResNet-18 on an H100, against
        0.90–0.96× with the reads; ``docs/benchmarks.md``). The same estimator with three changes:

        - the ``M × M`` eigen-decompositions become Cholesky factors: the whitening takes
          :math:`(CC^\top + \delta I)^{-1}` with ``δ = M·eps`` of the work dtype relative to
          ``max |CCᵀ|`` (the default's rank cut, as a jitter), and the solve factorises
          ``B + (ε/τ²) I`` at each step;
        - a step whose ``g`` is not finite writes a zero direction instead of setting ``.grad`` to
          ``None``: no parameter receives a NaN, but the optimizer still applies its momentum and
          weight decay at that step, the step counts in ``step_count`` and ``num_skipped``, and the
          basis draws are not rewound;
        - the reduction-ratio rule, ``ε``'s factor and the counters stay on the device: reading
          ``current_eps()``, ``num_fallbacks``, ``num_skipped`` or ``state_dict()`` reads them (one
          wait for the GPU).

        Needs a single process, no ``grad_scaler``, ``lam = 0`` and the
        :class:`~wngkernels.AuthorsRule` or a fixed bandwidth (``ValueError`` otherwise).

    Attributes
    ----------
    num_fallbacks : int
        Steps where ``g`` replaced ``w`` (``⟨g, w⟩ ≤ 0``, or ``T``/``w`` non-finite).
    num_skipped : int
        Steps with non-finite ``g``: no direction written (``sync_free``: a zero direction).
    num_short_batches : int
        Refreshes whose batch had fewer pairs ``N·d`` than ``num_basis`` (a short last batch, on
        any rank): the basis then has ``N·d`` pairs, the smallest over the ranks.
    last_basis : NystromBasis or None
        The last basis drawn (indices into rank 0's first micro-batch).
    last_kernel : Kernel or None
        The kernel with the bandwidth used at the last refresh.

    Examples
    --------
    >>> import torch
    >>> from wngkernels.torch import KWNG
    >>> model = torch.nn.Linear(4, 3)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> kwng = KWNG(model.parameters(), optimizer=opt, generator=0)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> out = model(x)
    >>> loss = torch.nn.functional.cross_entropy(out, y)
    >>> opt.zero_grad(); kwng.precondition(out, loss); opt.step()
    True
    """

    def __init__(self, params: Iterable, *, num_basis: int = 5, eps: Schedule = 1e-5, lam: Schedule = 0.0,
                 damping: str = "jacobian", damping_floor: float = DAMPING_FLOOR,
                 kernel: Kernel | None = None, adaptive_eps: bool = True,
                 eps_bounds: tuple[float, float] = (1e-10, 1e5), eps_factor: float = 0.85, window: int = 5,
                 clip_norm: Schedule | None = 1.0, refresh_every: int = 1, generator=None,
                 lr: Schedule | None = None, optimizer: torch.optim.Optimizer | None = None,
                 grad_scaler=None, accumulation_steps: int = 1, vjp_mode: str = "auto",
                 distributed: bool | None = None, process_group=None, cuda_graphs: bool = True,
                 sync_free: bool = False):
        self._params = _collect_params(params)
        self.num_basis = check_int(num_basis, "num_basis", minimum=1)
        self.eps = _check_schedule(eps, "eps", positive=True)
        self.lam = _check_schedule(lam, "lam", positive=False)
        if damping not in ("jacobian", "identity"):
            raise ValueError(f"damping must be 'jacobian' or 'identity'; got {damping!r}")
        self.damping = damping
        self.damping_floor = check_positive_scalar(damping_floor, "damping_floor")
        if kernel is None:
            kernel = Gaussian(AuthorsRule())
        if not isinstance(kernel, Kernel):
            raise TypeError(f"kernel must be a wngkernels Kernel; got {type(kernel).__name__}")
        self.kernel = kernel
        self.adaptive_eps = bool(adaptive_eps)
        lo, hi = (float(b) for b in eps_bounds)
        if not (0 < lo <= hi < math.inf):
            raise ValueError(f"eps_bounds must be (low, high) with 0 < low <= high < inf; got {eps_bounds!r}")
        self.eps_bounds = (lo, hi)
        if not 0 < float(eps_factor) < 1:
            raise ValueError(f"eps_factor must lie in (0, 1); got {eps_factor!r}")
        self.eps_factor = float(eps_factor)
        self.window = check_int(window, "window", minimum=1)
        self.clip_norm = _check_schedule(clip_norm, "clip_norm", positive=True, allow_none=True)
        self.refresh_every = check_int(refresh_every, "refresh_every", minimum=1)
        self.accumulation_steps = check_int(accumulation_steps, "accumulation_steps", minimum=1)
        self.lr = _check_schedule(lr, "lr", positive=False, allow_none=True)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        self.optimizer = optimizer
        if grad_scaler is not None and optimizer is None:
            raise ValueError("grad_scaler needs optimizer=: KWNG calls grad_scaler.unscale_(optimizer)")
        self.grad_scaler = grad_scaler
        if vjp_mode not in ("auto", "batched", "loop"):
            raise ValueError(f"vjp_mode must be 'auto', 'batched' or 'loop'; got {vjp_mode!r}")
        self.vjp_mode = vjp_mode
        self._vjp_used: str | None = None  # what "auto" resolved to on the first backward
        self._comm = Comm(distributed, process_group)
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool; got {type(cuda_graphs).__name__}")
        self._graphs = RowGraphs() if cuda_graphs else None
        self._tails = TailGraphs() if cuda_graphs else None  # sync_free's steps between refreshes
        self.sync_free = _check_sync_free(self, sync_free)
        self._dev: DeviceState | None = None  # sync_free: the ratio rule, ε's factor and counters
        self._draws = _Draws(generator)
        self._step = 0
        self._eps_scale = 1.0
        self._ratio = _Ratio()
        self._cache: _Refresh | None = None
        self._pending: _Pending | None = None
        self._num_fallbacks = 0
        self._num_skipped = 0
        self.num_short_batches = 0
        self.last_basis: NystromBasis | None = None
        self._last_kernel: Kernel | None = None  # last_kernel, or
        self._last_pending: tuple | None = None  # (kernel, ℓ on the device) not read yet
        self._warned_lr = False

    # -- hyperparameters --------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Directions written so far (skipped steps not counted, except with ``sync_free``)."""
        return self._step

    @property
    def num_fallbacks(self) -> int:
        """Steps where ``g`` replaced ``w`` (``⟨g, w⟩ ≤ 0``, or ``T``/``w`` non-finite); with
        ``sync_free``, reading it reads the device."""
        self._flush()
        return self._num_fallbacks

    @num_fallbacks.setter
    def num_fallbacks(self, value: int) -> None:
        self._flush()
        self._num_fallbacks = value

    @property
    def num_skipped(self) -> int:
        """Steps with non-finite ``g``; with ``sync_free``, reading it reads the device."""
        self._flush()
        return self._num_skipped

    @num_skipped.setter
    def num_skipped(self, value: int) -> None:
        self._flush()
        self._num_skipped = value

    def _flush(self) -> None:
        """``sync_free``: the device's ratio rule, ``ε`` factor and counters into the host's fields (one
        read); the next step copies them back."""
        if self._dev is not None:
            dev, self._dev = self._dev, None
            self._ratio, self._eps_scale, fallbacks, skipped = dev.read()
            self._num_fallbacks += fallbacks
            self._num_skipped += skipped

    def _value(self, h, name: str, positive: bool):
        if h is None:
            return None
        if not callable(h):
            return h
        return check_positive_scalar(h(self._step), f"{name}({self._step})", allow_zero=not positive)

    @property
    def last_kernel(self) -> Kernel | None:
        """The kernel with the (float) bandwidth of the last refresh; ``None`` before the first.
        Where the bandwidth was left on the device, the first access after the refresh reads it
        (one scalar); an unusable one (that refresh was dropped) leaves the previous kernel."""
        if self._last_pending is not None:
            kernel, self._last_pending = with_device_bandwidth(*self._last_pending), None
            self._last_kernel = kernel or self._last_kernel
        return self._last_kernel

    def current_eps(self) -> float:
        """``ε`` for the next step: the schedule's value times the adapted factor, within bounds
        (with ``sync_free``, read from the device)."""
        self._flush()
        base = self._value(self.eps, "eps", True)
        return min(max(base * self._eps_scale, self.eps_bounds[0]), self.eps_bounds[1])

    def _current_lr(self) -> float | None:
        if self.lr is not None:
            return self._value(self.lr, "lr", False)
        if self.optimizer is not None:
            return float(self.optimizer.param_groups[0]["lr"])
        return None

    # -- capture: basis, bandwidth, C Cᵀ and T ----------------------------------------------

    def capture(self, outputs, loss: torch.Tensor | None = None, *,
                basis: NystromBasis | None = None) -> None:
        """Record a batch's outputs (and loss) before the user's ``backward``.

        Parameters
        ----------
        outputs : Tensor or sequence of Tensor
            ``h_θ(Z)``, each ``(N, ...)``, attached to the graph (flattened to ``(N, d)``).
        loss : Tensor, optional
            The scalar whose ``backward`` fills ``.grad`` (for the adaptive ``ε``). With
            accumulation, pass the loss you call ``backward`` on (usually divided by ``k``).
        basis : NystromBasis, optional
            Use these ``M`` pairs (indices into this batch, rank 0's under data parallel)
            instead of drawing them, for controlled experiments; this step then refreshes
            ``T̃`` and ``D`` whatever ``refresh_every`` says. Only at a step's first
            micro-batch.
        """
        self._capture(outputs, loss, basis, fuse=False)

    # -- step: reduce, solve, safety, write ---------------------------------------------------

    def step(self) -> bool:
        """Rewrite ``.grad`` with the KWNG direction, after the user's ``backward``.

        Returns
        -------
        bool
            ``True`` if a direction was written; ``False`` while micro-batches are still being
            accumulated, or when the step was skipped (non-finite ``g``).
        """
        pend = self._pending
        if pend is None:
            raise RuntimeError("step() needs capture(outputs) first (or use precondition(outputs, loss))")
        if pend.count < self.accumulation_steps:
            return False
        self._pending = None
        self._unscale()
        params = [self._params[i] for i in pend.active]
        present = [j for j, p in enumerate(params) if p.grad is not None]
        g = self._gradient(pend, params, present)
        if self.sync_free:
            return self._step_sync_free(pend, params, present, g)
        # where ε cannot move at this step, the direction comes first and one read serves the step
        ahead = self._ahead(pend, present)
        grads = [params[j].grad for j in present]
        clip = self._value(self.clip_norm, "clip_norm", True)
        decided, early = None, False
        if ahead:  # a single process: the reduction is the identity on C Cᵀ, T and the counts
            local = _Reduced(pend.cc, pend.t, pend.factor, float(pend.n), None, pend.bad, False)
            cache, w = self._candidate(pend, local, g, params, present)
            if w is not None:  # decided now, read with the step's values
                decided = decided_direction(w, g, clip)
                early = self._writes_early(decided[0], grads)
                if early:  # launched while the GPU still works, not after the read
                    _write(decided[0], grads)
        red = reduce_step(self._comm, pend, params, g, self.accumulation_steps,
                          extra=None if decided is None else decided[1])
        if red.g_bad:
            return self._skip(pend, params)
        if not present:
            return False
        self._adapt(red.loss_now)
        if not ahead:
            cache, w = self._candidate(pend, red, g, params, present)
        self._cache = cache
        if decided is None:  # ε may have moved, or there is no w: decided now, read on its own
            decided = decided_direction(g if w is None else w, g, clip)
            stats = decided[1].tolist()
        else:
            stats = red.extra
        out, fell_back, gw = decided[0], int(stats[0]) + (w is None), stats[1]
        if not early:
            if not fell_back and not fits(out, grads):  # too long for a half-precision .grad: g
                out, more = decided_direction(g, g, clip)
                fell_back, gw = 1, more.tolist()[1]
            _write(out, grads)
        self._num_fallbacks += fell_back
        self._ratio.record(red.loss_now, gw, self._current_lr())
        self._step += 1
        return True

    def _step_sync_free(self, pend: _Pending, params, present, g) -> bool:
        """:meth:`step` reading nothing back (``sync_free``): the same direction from the Cholesky
        factorisations, the fallback, clipping, the half-precision fit and the ratio rule decided on
        the device (:func:`~._tail.step_tail`, replayed from a CUDA graph at the steps that reuse a
        cached solver); a non-finite ``g`` writes zeros."""
        if not present:
            return False
        if self._dev is None:
            self._dev = DeviceState(self._ratio, self._eps_scale, g.device)
        loss_now = pend.loss_sum if pend.loss_count == self.accumulation_steps and pend.loss_count else None
        lr, base = self._current_lr(), self._value(self.eps, "eps", True)
        adapt = self.adaptive_eps and loss_now is not None
        if adapt and lr is None and not self._warned_lr:
            self._warned_lr = True
            warnings.warn("KWNG: adaptive_eps needs the learning rate (pass lr= or optimizer=); "
                          "eps stays fixed", UserWarning, stacklevel=3)
        cache = self._cache
        if pend.refresh:
            lam = self._value(self.lam, "lam", False)
            if lam > 0:
                raise ValueError(f"sync_free=True needs lam = 0 (the lam schedule gave {lam!r} at step "
                                 f"{self._step})")
            cache = refreshed_sync_free(pend, self.damping, self.damping_floor, self._step)
        solver, cached = sync_free_solver(cache, g, params, present)
        clip = self._value(self.clip_norm, "clip_norm", True)
        grads = [params[j].grad for j in present]
        options = dict(adapt=adapt, clip_on=clip is not None, factor=self.eps_factor, bounds=self.eps_bounds,
                       window=self.window, limit=grad_limit(grads, g.dtype))
        scal = (base, math.nan if lr is None else float(lr), 1.0 if clip is None else float(clip))
        if cached and not pend.refresh and self._tails is not None and g.device.type == "cuda" \
                and not torch.cuda.is_current_stream_capturing():
            out = self._tails(g, loss_now, scal, solver, self._dev, **options)
        else:
            out = step_tail(g, loss_now, scal, solver, self._dev, **options)
        _write(out, grads)
        self._cache = cache
        self._step += 1
        return True

    def _writes_early(self, w, grads) -> bool:
        """Whether the direction is written before the step's read: nothing needs ``.grad`` left as
        it was on a skipped step (a grad scaler does; without one a skipped step sets ``.grad`` to
        ``None``) and ``w`` fits the ``.grad`` dtypes without a read (no half-precision ``.grad``)."""
        scaler = self.grad_scaler is not None and self.grad_scaler.is_enabled()
        return not scaler and fits(w, grads, read=False)

    def _unscale(self) -> None:
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            try:
                self.grad_scaler.unscale_(self.optimizer)
            except RuntimeError as exc:
                if "already been called" not in str(exc):
                    raise

    def _gradient(self, pend: _Pending, params, present) -> torch.Tensor:
        """``g``, the present gradients flattened into one vector of the work dtype."""
        dtype = pend.cc.dtype if pend.cc is not None else _work_dtype(params[0], params)
        if not present:
            return torch.zeros(0, dtype=dtype, device=params[0].device)
        return torch.cat([params[j].grad.reshape(-1).to(dtype) for j in present])

    def _skip(self, pend: _Pending, params) -> bool:
        """A step with non-finite ``g``: the scaler skips it; without one, no parameter moves."""
        self._draws.set_state(pend.rng_state)
        self._num_skipped += 1
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            for p in params:
                p.grad = None
        return False

    def precondition(self, outputs, loss: torch.Tensor, *, basis: NystromBasis | None = None) -> bool:
        """``capture(outputs, loss)``, ``loss.backward()`` (scaled by ``grad_scaler``), ``step()``.

        Parameters
        ----------
        outputs : Tensor or sequence of Tensor
            ``h_θ(Z)`` ``(N, ...)``, attached to the graph that ``loss`` was computed from.
        loss : Tensor
            Scalar.
        basis : NystromBasis, optional
            As in :meth:`capture`.

        Returns
        -------
        bool
            As :meth:`step`.
        """
        _check_loss(loss)
        if not self._capture(outputs, loss, basis, fuse=True):
            if self.grad_scaler is not None:
                self.grad_scaler.scale(loss).backward()
            else:
                loss.backward()
        return self.step()

    def _ahead(self, pend: _Pending, present) -> bool:
        """Whether the direction can be computed before the step's one host read: a single process,
        and ``ε`` cannot move at this step (no reduction-ratio window can close)."""
        if not present or (self._comm.active and self._comm.world_size > 1):
            return False
        return not (self.adaptive_eps and pend.loss_count > 0 and self._ratio.may_close(self.window))

    def _candidate(self, pend: _Pending, red: _Reduced, g, params, present):
        """The refresh due at this step (else the cache), from the reduced ``C Cᵀ``, ``T`` and counts,
        and ``w`` from it (``None``: none, or it cannot give one); nothing is stored."""
        cache = self._cache
        if pend.refresh:
            lam = self._value(self.lam, "lam", False)
            cache = None if red.bad else refreshed(red.cc / red.n, red.t, pend, 1.0 / (red.t_factor * red.n),
                                                   lam=lam, damping=self.damping, floor=self.damping_floor,
                                                   step=self._step)
        return cache, self._direction(cache, g, params, present)

    def _direction(self, cache, g, params, present):
        """``w`` from ``cache`` (``T̃`` and ``D``), or ``None`` (no cache, or it cannot give one)."""
        return cached_direction(cache, g, params, present, self.current_eps())

    def _adapt(self, loss_now: float | None) -> None:
        """The reduction-ratio rule (:class:`_Ratio`) moves ``ε`` at the end of each window."""
        if not self.adaptive_eps or loss_now is None:
            return
        st = self._ratio
        if st.prev_lr is None and st.prev_loss is not None and (st.prev_gw or 0) > 0:
            if not self._warned_lr:
                self._warned_lr = True
                warnings.warn("KWNG: adaptive_eps needs the learning rate (pass lr= or optimizer=); "
                              "eps stays fixed", UserWarning, stacklevel=3)
            return
        r_max = st.observe(loss_now, self.window)
        if r_max is None:
            return
        eps = _Ratio.moved(self.current_eps(), r_max, self.eps_factor, self.eps_bounds)
        self._eps_scale = eps / self._value(self.eps, "eps", True)

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self, include_cache: bool = True) -> dict:
        """Everything a resumed run needs to continue bit-identically.

        Holds the step, the adapted ``ε`` (as value and factor), the counters, the
        reduction-ratio state, the generator state, the current values of the hyperparameters
        (never callables) and, with ``include_cache``, the cached ``T̃`` and ``D`` that
        ``refresh_every > 1`` reuses. Tensors and plain Python values only
        (``torch.load(..., weights_only=True)`` reads it).
        """
        return _checkpoint.state_dict(self, include_cache)

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (not mutated); cached tensors go to the parameters' device.

        Everything is checked before anything changes: a state that is not a
        :meth:`state_dict` of a KWNG over the same parameters with the same ``num_basis`` raises
        ``ValueError`` (``TypeError`` if it is not a dict) and leaves this instance as it was.
        """
        _checkpoint.load_state_dict(self, state)

    def __repr__(self) -> str:
        q = sum(p.numel() for p in self._params)
        def show(h):
            return getattr(h, "__name__", "schedule") if callable(h) else repr(h)
        return (f"KWNG(params={len(self._params)} tensors, q={q}, num_basis={self.num_basis}, "
                f"eps={show(self.eps)}, lam={show(self.lam)}, damping={self.damping!r}, "
                f"kernel={self.kernel!r}, adaptive_eps={self.adaptive_eps}, "
                f"clip_norm={show(self.clip_norm)}, "
                f"refresh_every={self.refresh_every}, accumulation_steps={self.accumulation_steps}, "
                f"sync_free={self.sync_free}, step={self._step})")


def _check_sync_free(kwng: KWNG, sync_free) -> bool:
    """``sync_free``, checked against the options that need a read of the device."""
    if not isinstance(sync_free, bool):
        raise TypeError(f"sync_free must be a bool; got {type(sync_free).__name__}")
    if not sync_free:
        return False
    why = None
    if kwng.grad_scaler is not None:
        why = "a grad_scaler (it reads its found-inf flag at every step)"
    elif not callable(kwng.lam) and kwng.lam > 0:
        why = f"lam = {kwng.lam!r} > 0 (the kernel's Gram matrix needs the bandwidth on the host)"
    elif callable(kwng.kernel.bandwidth) and not isinstance(kwng.kernel.bandwidth, AuthorsRule):
        why = (f"the bandwidth rule {kwng.kernel.bandwidth!r} (only AuthorsRule or a fixed bandwidth is "
               "evaluated on the device)")
    elif kwng._comm.active and kwng._comm.world_size > 1:
        why = "a process group (the statistics are reduced through the host)"
    if why is not None:
        raise ValueError(f"sync_free=True cannot be used with {why}")
    return True


def _write(w: torch.Tensor, grads: list[torch.Tensor]) -> None:
    """``w`` into the ``.grad`` tensors ``grads``, in their order and shapes."""
    pieces = torch.split(w, [p.numel() for p in grads])
    _copy_all(grads, [v.view_as(p) for v, p in zip(pieces, grads, strict=True)])

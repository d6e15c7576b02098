r"""``KWNG``: the kernelized Wasserstein natural gradient as a PyTorch preconditioner.

A preconditioner, not an optimizer: it rewrites each parameter's
``.grad`` with the KWNG direction :math:`w = (\hat G + \varepsilon D^{-1})^{-1} g` and any
``torch.optim`` optimizer steps as usual. Per step (the PyTorch page of the documentation):

1. ``capture(outputs)``: draw ``M`` basis pairs from the batch (torch's default generator
   unless ``generator`` is given), resolve the bandwidth rule, form the cotangents and accumulate
   :math:`\sum_n H_nH_n^\top` (for :math:`CC^\top`) and :math:`T` from one batched backward;
2. the user's ``loss.backward()`` fills ``.grad`` with ``g`` (so DDP, AMP and accumulation keep
   working as they do without KWNG);
3. ``step()``: :func:`~wngkernels.whiten` (ridgeless when ``lam = 0``),
   :func:`~wngkernels.damping_from_whitened` (``D = diag(Ĝ)^{-1/2}``, the authors' guard;
   parameters the outputs do not see are excluded and take the rule of
   :class:`~wngkernels.WhitenedSolver`),
   :func:`~wngkernels.solve_whitened`; fall back to ``g`` where ``⟨g, w⟩ ≤ 0`` or anything is
   non-finite; clip to ``clip_norm``; write ``.grad``; adapt ``ε``.

``precondition(outputs, loss)`` is the three steps in one call.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .._backend import check_int, check_positive_scalar
from ..bandwidth import AuthorsRule
from ..kernels import Gaussian, Kernel
from ..nystrom import NystromBasis, nystrom_basis
from ..solve import (
    DAMPING_FLOOR,
    WhitenedSolver,
    damping_from_whitened,
    factorize_whitened,
    solve_whitened,
    whiten,
)
from ._batched import (
    _as_output_list,
    _check_loss,
    _rows_from_grads,
    _split_cotangents,
    _work_dtype,
    batched_vjp,
    flatten_outputs,
    grad_only_through,
)
from ._dist import Comm

__all__ = ["KWNG"]

Schedule = float | Callable[[int], float]


def _collect_params(params) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params must be an iterable of tensors or of dicts with a 'params' key (as for torch.optim); "
            "got a bare Tensor: pass model.parameters() or [tensor]"
        )
    try:
        items = list(params)
    except TypeError:
        got = type(params).__name__
        raise TypeError(f"params must be an iterable of tensors or dicts; got {got}") from None
    flat: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, dict):
            if "params" not in item:
                raise ValueError("a parameter group (dict) must have a 'params' key")
            ps = item["params"]
            flat.extend([ps] if isinstance(ps, torch.Tensor) else list(ps))
        else:
            flat.append(item)
    if not flat:
        raise ValueError("params is empty: KWNG needs at least one parameter")
    seen = set()
    for i, p in enumerate(flat):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a Tensor; got {type(p).__name__}")
        if not p.is_leaf:
            raise ValueError(f"params[{i}] is not a leaf tensor; pass the model's parameters")
        if id(p) in seen:
            raise ValueError(f"params contains the same parameter twice (again at position {i})")
        seen.add(id(p))
    return flat


def _check_schedule(value, name: str, *, positive: bool, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if callable(value):
        return value
    try:
        return check_positive_scalar(value, name, allow_zero=not positive)
    except TypeError:
        raise TypeError(f"{name} must be a float or a callable of the step; got {value!r}") from None


class _Draws:
    """Where the basis draws come from: torch's default CPU generator (``None``), a
    ``torch.Generator``, or a NumPy generator (or a seed for one)."""

    def __init__(self, generator):
        if generator is None or isinstance(generator, (torch.Generator, np.random.Generator)):
            self.source = generator
        elif isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
            self.source = np.random.default_rng(int(generator))
        else:
            raise TypeError("generator must be None, an int seed, a numpy.random.Generator or a "
                            f"torch.Generator; got {type(generator).__name__}")

    def rng(self) -> np.random.Generator:
        """A NumPy generator for one basis draw (:func:`~wngkernels.nystrom_basis`)."""
        if isinstance(self.source, np.random.Generator):
            return self.source
        dev = "cpu" if self.source is None else self.source.device
        seed = torch.randint(0, 2**63 - 1, (), generator=self.source, device=dev)
        return np.random.default_rng(int(seed))

    def get_state(self):
        """``None`` (torch's default generator: the caller's to save), a ``torch.Generator``'s state
        tensor, or a NumPy bit generator's state with its arrays as lists (any bit generator, and
        ``torch.load(..., weights_only=True)`` reads it)."""
        if isinstance(self.source, np.random.Generator):
            return _plain(self.source.bit_generator.state)
        return None if self.source is None else self.source.get_state()

    def restored(self, state):
        """The source :meth:`get_state`'s output describes, built apart from this one (so a bad
        state changes nothing); ``ValueError`` if it is not such an output. A checkpoint's kind of
        source wins over this one's; a ``torch.Generator`` keeps its device."""
        if state is None:
            return None
        try:
            if isinstance(state, torch.Tensor):
                dev = self.source.device if isinstance(self.source, torch.Generator) else "cpu"
                gen = torch.Generator(device=dev)
                gen.set_state(state)
                return gen
            bits = getattr(np.random, str(state["bit_generator"]))()
            if not isinstance(bits, np.random.BitGenerator):
                raise TypeError(state["bit_generator"])
            bits.state = _arrays(state)
            return np.random.Generator(bits)
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
            raise ValueError(f"state['rng'] is not a generator state saved by KWNG.state_dict() ({exc!r})"
                             ) from None

    def adopt(self, source) -> None:
        """Take :meth:`restored`'s result; a generator of the same kind is set in place (it may be
        the caller's)."""
        if isinstance(source, torch.Generator) and isinstance(self.source, torch.Generator):
            self.source.set_state(source.get_state())
        elif (isinstance(source, np.random.Generator) and isinstance(self.source, np.random.Generator)
              and type(source.bit_generator) is type(self.source.bit_generator)):
            self.source.bit_generator.state = source.bit_generator.state
        else:
            self.source = source

    def set_state(self, state) -> None:
        """Restore :meth:`get_state`'s output."""
        self.adopt(self.restored(state))


def _plain(state):
    """A bit generator's state with NumPy arrays as ``{"array": list, "dtype": str}``."""
    if isinstance(state, dict):
        return {k: _plain(v) for k, v in state.items()}
    if isinstance(state, np.ndarray):
        return {"array": state.tolist(), "dtype": str(state.dtype)}
    return state


def _arrays(state):
    """:func:`_plain`'s inverse (states saved before it, with arrays left in, pass unchanged)."""
    if isinstance(state, dict):
        if set(state) == {"array", "dtype"}:
            return np.asarray(state["array"], dtype=state["dtype"])
        return {k: _arrays(v) for k, v in state.items()}
    return state


@dataclass
class _Pending:
    """What ``capture`` gathered since the last ``step``: local, unnormalised sums."""

    rng_state: object
    refresh: bool
    active: tuple[int, ...]
    count: int = 0
    n: int = 0
    loss_sum: torch.Tensor | float = 0.0  # a float64 tensor once a loss is seen: read with the step's stats
    loss_count: int = 0
    bad: bool = False  # T or C Cᵀ could not be formed (non-finite outputs, degenerate bandwidth)
    points: torch.Tensor | None = None  # (M, d)
    dims: torch.Tensor | None = None  # (M,)
    kernel: Kernel | None = None  # bandwidth resolved
    cc: torch.Tensor | None = None  # Σ_n H_n H_nᵀ (M, M)
    t: torch.Tensor | None = None  # factor · Σ_n Σ_i H_n[:, i] ∇θ X_{n,i}  (M, q), from the first backward
    factor: float = 1.0  # the cotangents' scale (loss scale / first micro-batch's N), undone in the whitening


@dataclass
class _Ratio:
    r"""The reduction-ratio rule's memory: :math:`r = 2(L_{prev} - L_{now})/(lr\,\langle g_{prev},
    w_{prev}\rangle)` and its running maximum over a window."""

    prev_loss: float | None = None
    prev_gw: float | None = None
    prev_lr: float | None = None
    r_max: float = -math.inf
    count: int = 0

    def record(self, loss: float | None, gw: float, lr: float | None) -> None:
        """What the next ratio compares with: this step's loss, ``⟨g, w⟩`` and learning rate."""
        self.prev_loss, self.prev_gw, self.prev_lr = loss, gw, lr

    def observe(self, loss_now: float, window: int) -> float | None:
        """Add the ratio of ``loss_now``; at the end of a window, its maximum (and a new window)."""
        if self.prev_loss is None or not self.prev_gw or self.prev_gw <= 0:
            return None
        if self.prev_lr is None or self.prev_lr <= 0:
            return None
        r = 2.0 * (self.prev_loss - loss_now) / (self.prev_lr * self.prev_gw)
        if not math.isfinite(r):
            return None
        self.r_max = max(self.r_max, r)
        self.count += 1
        if self.count < window:
            return None
        r_max, self.r_max, self.count = self.r_max, -math.inf, 0
        return r_max


@dataclass
class _Refresh:
    """What a refresh computed and the steps until the next one reuse."""

    t_white: torch.Tensor  # T̃ (M, q)
    damping: torch.Tensor | None  # the diagonal of D (q,), None for D = I
    active: tuple[int, ...]  # the parameters it was computed for
    step: int
    solver: WhitenedSolver | None = None  # factorised at the first full solve


class _Reduced(NamedTuple):
    """A step's statistics summed over the process group."""

    cc: torch.Tensor | None
    t: torch.Tensor | None
    t_factor: float  # T holds t_factor · Σ H ∇X
    n: float  # samples
    loss_now: float | None  # the step's loss, where every micro-batch of every rank gave one
    bad: bool  # T or C Cᵀ could not be formed on some rank
    g_bad: bool  # g is non-finite on some rank


class KWNG:
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

    Attributes
    ----------
    num_fallbacks : int
        Steps where ``g`` replaced ``w`` (``⟨g, w⟩ ≤ 0``, or ``T``/``w`` non-finite).
    num_skipped : int
        Steps with non-finite ``g``: no direction written.
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
                 distributed: bool | None = None, process_group=None):
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
        self._draws = _Draws(generator)
        self._step = 0
        self._eps_scale = 1.0
        self._ratio = _Ratio()
        self._cache: _Refresh | None = None
        self._pending: _Pending | None = None
        self.num_fallbacks = 0
        self.num_skipped = 0
        self.num_short_batches = 0
        self.last_basis: NystromBasis | None = None
        self.last_kernel: Kernel | None = None
        self._warned_lr = False

    # -- hyperparameters --------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Directions written so far (skipped steps not counted)."""
        return self._step

    def _value(self, h, name: str, positive: bool):
        if h is None:
            return None
        if not callable(h):
            return h
        return check_positive_scalar(h(self._step), f"{name}({self._step})", allow_zero=not positive)

    def current_eps(self) -> float:
        """``ε`` for the next step: the schedule's value times the adapted factor, within bounds."""
        base = self._value(self.eps, "eps", True)
        return min(max(base * self._eps_scale, self.eps_bounds[0]), self.eps_bounds[1])

    def _current_lr(self) -> float | None:
        if self.lr is not None:
            return self._value(self.lr, "lr", False)
        if self.optimizer is not None:
            return float(self.optimizer.param_groups[0]["lr"])
        return None

    # -- capture: basis, bandwidth, C Cᵀ and T ----------------------------------------------

    def _active(self) -> tuple[int, ...]:
        return tuple(i for i, p in enumerate(self._params) if p.requires_grad)

    def _needs_refresh(self, active) -> bool:
        c = self._cache
        return c is None or c.active != active or self._step - c.step >= self.refresh_every

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

    def _capture(self, outputs, loss, basis, fuse: bool) -> bool:
        """:meth:`capture`; with ``fuse``, also ``loss``'s gradient where it can ride on ``T``'s backward.

        Returns whether ``.grad`` received the loss's gradient (then no ``backward`` must follow).
        """
        x = flatten_outputs(outputs)
        if loss is not None:
            _check_loss(loss)
        if basis is not None and not isinstance(basis, NystromBasis):
            raise TypeError(f"basis must be a NystromBasis; got {type(basis).__name__}")
        pend = self._pending
        if basis is not None and pend is not None:
            raise ValueError("basis can only be given at the first micro-batch of a step")
        if pend is not None and pend.count >= self.accumulation_steps:
            raise RuntimeError(
                f"capture was called {pend.count + 1} times without step() "
                f"(accumulation_steps={self.accumulation_steps})"
            )
        active = self._active()
        if not active:
            raise ValueError("no parameter requires grad: nothing to precondition")
        params = [self._params[i] for i in active]
        dtype = _work_dtype(x, params)
        xd = x.detach().to(dtype)
        if pend is None:
            if basis is not None:
                basis.check(*xd.shape)
            pend = _Pending(rng_state=self._draws.get_state(), active=active,
                            refresh=basis is not None or self._needs_refresh(active))
        elif pend.active != active:
            self._discard(pend)
            raise RuntimeError("the set of parameters requiring grad changed between micro-batches; "
                               "the step's captured micro-batches were discarded")
        try:
            return self._accumulate(pend, outputs, x, xd, loss, basis, params, dtype, fuse)
        except BaseException:
            self._discard(pend)  # no half-captured step is left behind to be stepped on
            raise

    def _discard(self, pend: _Pending) -> None:
        """Forget a step's captured micro-batches and rewind a private generator to its start."""
        self._pending = None
        self._draws.set_state(pend.rng_state)

    def _accumulate(self, pend, outputs, x, xd, loss, basis, params, dtype, fuse) -> bool:
        if self._pending is None:
            if pend.refresh:
                self._draw(pend, xd, sum(p.numel() for p in params), basis)
            self._pending = pend
        pend.count += 1
        pend.n += x.shape[0]
        if loss is not None:
            pend.loss_sum = pend.loss_sum + loss.detach().reshape(()).to(torch.float64)  # no host read
            pend.loss_count += 1
        if pend.refresh and not pend.bad:
            if xd.shape[1] != pend.points.shape[1]:
                raise ValueError(
                    f"outputs must have d = {pend.points.shape[1]} features per sample in every "
                    f"micro-batch; got {xd.shape[1]}"
                )
            if not bool(torch.isfinite(xd).all()):
                pend.bad = True
                return False
            rows = pend.kernel.cross_hessian_rows(pend.points, pend.dims, xd)  # (M, n, d)
            flat = rows.reshape(rows.shape[0], -1)
            pend.cc += flat @ flat.T
            return self._backward(outputs, rows, loss if fuse else None, params, pend, dtype)
        return False

    def _backward(self, outputs, rows, loss, params, pend: _Pending, dtype) -> bool:
        """``T``'s rows into ``pend.t``; with a ``loss`` that reaches ``params`` only through the
        outputs, its gradient as one more row of the same batched backward, accumulated into
        ``.grad`` as ``loss.backward()`` would (scaled by the grad scaler's factor)."""
        outs = _as_output_list(outputs)
        scale = self._loss_scale(rows.device)
        m, n = rows.shape[0], rows.shape[1]
        if pend.t is None:  # one scale for every micro-batch: T accumulates without rescaling passes
            pend.factor = scale / n
        pieces = _split_cotangents(outs, rows * pend.factor)
        fused = loss is not None and self._can_fuse(loss, outs, params)
        if fused:
            loss_cot = torch.autograd.grad(loss, outs, retain_graph=True, allow_unused=True)
            fused = all(c is not None for c in loss_cot)
        if fused:
            pieces = [torch.cat([p, (c * scale).to(p.dtype)[None]])
                      for p, c in zip(pieces, loss_cot, strict=True)]
        # "auto" settles on the mode that worked the first time, so later passes can free the graph
        grads, self._vjp_used = batched_vjp(outs, pieces, params, vjp_mode=self._vjp_used or self.vjp_mode,
                                            retain_graph=not fused)
        t_grads = [None if g is None else g[:m] for g in grads]
        t = _rows_from_grads(t_grads, params, m, dtype)
        pend.t = t if pend.t is None else pend.t + t
        if fused:
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.grad = g[m].clone() if p.grad is None else p.grad + g[m]
        return fused

    @staticmethod
    def _can_fuse(loss, outs, params) -> bool:
        """One backward for ``T`` and ``g`` is exact only where nothing else expects ``loss.backward()``:
        no process group (DDP's reducer hooks the gradient accumulators), no hooks on the
        parameters, and a loss that reaches only ``params``, only through the outputs."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return False
        if any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in params):
            return False
        return grad_only_through(loss, outs, params)

    def _loss_scale(self, device) -> float:
        """The grad scaler's factor (1 without one); initialises a fresh scaler on ``device``, as the
        ``scaler.scale(loss)`` that a fused backward replaces would."""
        s = self.grad_scaler
        if s is None or not s.is_enabled():
            return 1.0
        return float(s.scale(torch.ones((), device=device)))

    def _draw(self, pend: _Pending, xd: torch.Tensor, q: int, basis: NystromBasis | None) -> None:
        """Basis points and dims (rank 0's, broadcast) and the resolved kernel."""
        comm = self._comm
        if basis is None:
            basis = nystrom_basis(tuple(xd.shape), self._pairs(xd), rng=self._draws.rng())
        dev = xd.device
        idx = torch.as_tensor(basis.indices.copy(), device=dev)
        points = xd.index_select(0, idx)
        dims = torch.as_tensor(basis.dims.copy(), device=dev)
        finite = torch.isfinite(xd).all().to(xd.dtype).reshape(1)
        if comm.active:
            comm.broadcast_(points)
            comm.broadcast_(dims)
            finite = comm.sum_(finite) / comm.world_size
        m = basis.num_basis
        pend.cc = torch.zeros(m, m, dtype=xd.dtype, device=dev)
        pend.points, pend.dims = points, dims
        self.last_basis = basis
        if float(finite) < 1.0:
            pend.bad = True
            return
        try:
            pend.kernel = self._resolve(points, xd)
        except ValueError:  # e.g. all outputs equal: the bandwidth rule gives 0
            pend.bad = True
            return
        self.last_kernel = pend.kernel

    def _pairs(self, xd: torch.Tensor) -> int:
        """``M``, or fewer where a batch has fewer pairs ``N·d`` (a short last batch): every rank
        takes the smallest ``N·d`` of the group, so all draw the same number. Counted. Every rank
        raises ``ValueError`` if the ranks' outputs have different ``d``."""
        n, d = xd.shape
        available = n * d
        if self._comm.active and self._comm.world_size > 1:
            got = self._comm.min_(torch.tensor([available, d, -d], device=xd.device)).tolist()
            available, low, high = got[0], got[1], -got[2]
            if low != high:
                raise ValueError(f"outputs must have the same number of features d on every rank; the ranks "
                                 f"have d from {low} to {high}")
        if available < self.num_basis:
            self.num_short_batches += 1
            return available
        return self.num_basis

    def _resolve(self, points: torch.Tensor, xd: torch.Tensor) -> Kernel:
        kernel, comm = self.kernel, self._comm
        rule = kernel.bandwidth
        if not callable(rule):
            return kernel
        if not comm.active or comm.world_size == 1:
            return kernel.resolve(points, xd)
        if isinstance(rule, AuthorsRule):
            # the rule on the union batch: global mean, then the mean squared deviation
            stats = comm.sum_(torch.cat([xd.sum(0), xd.new_tensor([xd.shape[0]])]))
            center = stats[:-1] / stats[-1]
            dev = comm.sum_(((xd - center) ** 2).sum().reshape(1))
            mean_sq = float(((points - center) ** 2).sum(1).mean() + dev[0] / stats[-1])
            return kernel.with_bandwidth(rule.from_mean_square(mean_sq))  # 0 or an overflow: ValueError
        # another rule: rank 0 evaluates it on its own batch; a failure there (NaN) reaches every rank
        ell = math.nan
        if comm.rank == 0:
            try:
                ell = kernel.resolve(points, xd).bandwidth
            except ValueError:
                pass
        ell = float(comm.broadcast_(xd.new_tensor([ell], dtype=torch.float64))[0])
        if not math.isfinite(ell) or ell <= 0:
            raise ValueError(f"the bandwidth rule gave a degenerate bandwidth on rank 0 ({ell})")
        return kernel.with_bandwidth(ell)

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
        red = self._reduce(pend, params, g)
        if red.g_bad:
            return self._skip(pend, params)
        if not present:
            return False
        self._adapt(red.loss_now)
        if pend.refresh:
            self._cache = None if red.bad else self._whitened(red.cc / red.n, red.t, pend,
                                                              1.0 / (red.t_factor * red.n))
        grads = [params[j].grad for j in present]
        w, gw = self._safe_direction(g, params, present, grads)
        self._ratio.record(red.loss_now, gw, self._current_lr())
        pieces = torch.split(w, [p.numel() for p in grads])
        _copy_all(grads, [v.view_as(p) for v, p in zip(pieces, grads, strict=True)])
        self._step += 1
        return True

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

    def _reduce(self, pend: _Pending, params, g: torch.Tensor) -> _Reduced:
        """Sum ``C Cᵀ``, ``T``, the counts and the failure flags over the process group (one
        collective for the matrices, one for the float64 counts, which stay exact)."""
        stats = torch.tensor([pend.n, 0.0, pend.loss_count, float(pend.bad), 0.0],
                             dtype=torch.float64, device=g.device)
        if isinstance(pend.loss_sum, torch.Tensor):  # summed on the device: read once, with the rest
            stats[1] = pend.loss_sum.to(g.device)
        stats[4] = (~torch.isfinite(g)).any().to(torch.float64)
        cc, t = pend.cc, pend.t
        if pend.refresh and t is None:  # no backward ran (non-finite outputs): zeros for the reduction
            t = torch.zeros(cc.shape[0], sum(p.numel() for p in params), dtype=g.dtype, device=g.device)
        comm = self._comm
        t_factor = pend.factor
        if comm.active and comm.world_size > 1:
            if pend.refresh:  # each rank scaled its cotangents by its own batch size: undo before the sum
                cc, t = comm.sum_all([cc, t / t_factor])
                t_factor = 1.0
            stats = comm.sum_(stats)
        n_tot, loss_sum, loss_count, bad, g_bad = stats.tolist()
        world = comm.world_size
        loss_now = loss_sum / world if loss_count == world * self.accumulation_steps else None
        return _Reduced(cc, t, t_factor, n_tot, loss_now, bad > 0, g_bad > 0)

    def _skip(self, pend: _Pending, params) -> bool:
        """A step with non-finite ``g``: the scaler skips it; without one, no parameter moves."""
        self._draws.set_state(pend.rng_state)
        self.num_skipped += 1
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            for p in params:
                p.grad = None
        return False

    def _safe_direction(self, g, params, present, grads) -> tuple[torch.Tensor, float]:
        """``w`` clipped, and ``⟨g, w⟩``; ``g`` (counted) where ``w`` is missing, non-finite, not a
        descent direction, or too long for a half-precision ``.grad``. ``g = 0`` gives ``w = 0``."""
        w = self._direction(g, params, present)
        gw, norm = (math.nan, math.nan) if w is None else _dot_and_norm(g, w)
        if not (math.isfinite(gw) and math.isfinite(norm) and (gw > 0 or norm == 0)):
            w, (gw, norm) = g, _dot_and_norm(g, g)
            self.num_fallbacks += 1
        clip = self._value(self.clip_norm, "clip_norm", True)
        w, gw = _clipped(w, gw, norm, clip)
        if w is not g and not _fits(w, grads):
            gw, norm = _dot_and_norm(g, g)
            w, gw = _clipped(g, gw, norm, clip)
            self.num_fallbacks += 1
        return w, gw

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

    def _whitened(self, cc, t, pend: _Pending, scale: float):
        """``T̃`` of ``scale · t`` and ``D``; ``None`` if ``C Cᵀ`` is not finite. A non-finite ``T``
        shows up in the solve's result, which then falls back to ``g``."""
        lam = self._value(self.lam, "lam", False)
        k = None
        if lam > 0:
            k = pend.kernel.cross_hessian_selected(pend.points, pend.dims, pend.points, pend.dims)
            k = (k + k.T) / 2
        if not bool(torch.isfinite(cc).all()):
            return None
        t_white = whiten(cc, t, k=k, lam=lam, scale=scale)
        dmp = damping_from_whitened(t_white, floor=self.damping_floor) if self.damping == "jacobian" else None
        return _Refresh(t_white, dmp, pend.active, self._step)

    def _direction(self, g, params, present):
        c = self._cache
        if c is None:
            return None
        tw, dmp = c.t_white, c.damping
        if len(present) == len(params):
            # factorised once per refresh: between refreshes a step costs a few products
            solver = c.solver
            if solver is None or solver.values.dtype != g.dtype:
                try:
                    # the stable dual form: the authors' Woodbury form, tried, fell back to g
                    # 10 times a run on the seed's ResNet-18 (H100, float32; docs/benchmarks.md)
                    solver = factorize_whitened(tw.to(g.dtype),
                                                damping=None if dmp is None else dmp.to(g.dtype))
                except (torch.linalg.LinAlgError, ValueError):  # a non-finite T: the step falls back to g
                    return None
                c.solver = solver
            return solver.solve(g, self.current_eps(), check_finite=False)  # g is checked in step()
        if len(present) < len(params):
            sizes = [p.numel() for p in params]
            starts = np.concatenate([[0], np.cumsum(sizes)])
            keep = np.concatenate([np.arange(starts[j], starts[j + 1]) for j in present])
            keep = torch.as_tensor(keep, device=tw.device)
            tw = tw.index_select(1, keep)
            dmp = None if dmp is None else dmp.index_select(0, keep)
        try:
            return solve_whitened(tw.to(g.dtype), g, eps=self.current_eps(),
                                  damping=None if dmp is None else dmp.to(g.dtype))
        except (torch.linalg.LinAlgError, ValueError):  # non-finite T, or w beyond the dtype: g
            return None

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
        eps = self.current_eps()
        if r_max < 0.25:
            eps = eps / self.eps_factor
        elif r_max > 0.75:
            eps = eps * self.eps_factor
        eps = min(max(eps, self.eps_bounds[0]), self.eps_bounds[1])
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
        r = self._ratio
        state = {
            "step": self._step,
            "eps_scale": self._eps_scale,
            "eps": self.current_eps(),
            "num_fallbacks": self.num_fallbacks,
            "num_skipped": self.num_skipped,
            "num_short_batches": self.num_short_batches,
            "ratio": {"prev_loss": r.prev_loss, "prev_gw": r.prev_gw, "prev_lr": r.prev_lr,
                      "r_max": r.r_max, "count": r.count},
            "rng": self._draws.get_state(),
            "hyperparameters": {"lam": self._value(self.lam, "lam", False),
                                "clip_norm": self._value(self.clip_norm, "clip_norm", True),
                                "lr": self._current_lr(), "num_basis": self.num_basis,
                                "refresh_every": self.refresh_every},
            "cache": None,
        }
        c = self._cache
        if include_cache and c is not None:
            state["cache"] = {"t_white": c.t_white.clone(),
                              "damping": None if c.damping is None else c.damping.clone(),
                              "active": list(c.active), "step": c.step}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (not mutated); cached tensors go to the parameters' device.

        Everything is checked before anything changes: a state that is not a
        :meth:`state_dict` of a KWNG over the same parameters with the same ``num_basis`` raises
        ``ValueError`` (``TypeError`` if it is not a dict) and leaves this instance as it was.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from KWNG.state_dict(); got {type(state).__name__}")
        missing = [k for k in ("step", "eps_scale", "num_fallbacks", "num_skipped", "ratio", "rng",
                               "hyperparameters") if k not in state]
        if missing:
            raise ValueError(f"state is missing {', '.join(map(repr, missing))}: not a KWNG.state_dict()")
        state = copy.deepcopy(state)
        hyper = state["hyperparameters"]
        saved_m = hyper.get("num_basis") if isinstance(hyper, dict) else None
        if saved_m is not None and saved_m != self.num_basis:
            raise ValueError(f"state was saved with num_basis={saved_m}; this KWNG has num_basis="
                             f"{self.num_basis}: load it into a KWNG built with num_basis={saved_m}")
        r = state["ratio"]
        if not isinstance(r, dict) or not {"prev_loss", "prev_gw", "prev_lr", "r_max", "count"} <= set(r):
            raise ValueError("state['ratio'] must hold prev_loss, prev_gw, prev_lr, r_max and count")
        step = _state_count(state["step"], "step")
        ratio = _Ratio(*(_state_real(r[k], f"ratio.{k}") for k in ("prev_loss", "prev_gw", "prev_lr")),
                       _state_real(r["r_max"], "ratio.r_max", False), _state_count(r["count"], "ratio.count"))
        eps_scale = _state_real(state["eps_scale"], "eps_scale", False)
        if not (math.isfinite(eps_scale) and eps_scale > 0):
            raise ValueError(f"state['eps_scale'] must be a finite number > 0; got {eps_scale!r}")
        counts = [_state_count(state[k], k) for k in ("num_fallbacks", "num_skipped")]
        short = _state_count(state.get("num_short_batches", 0), "num_short_batches")
        source = self._draws.restored(state["rng"])
        cache = self._checked_cache(state.get("cache"), step)
        # everything checked: commit
        self._step, self._ratio, self._eps_scale = step, ratio, eps_scale
        self.num_fallbacks, self.num_skipped = counts
        self.num_short_batches = short
        self._draws.adopt(source)
        self._pending = None
        self._cache = cache

    def _checked_cache(self, c, step: int):
        """The cache of a state, on the parameters' device, after checking it fits these parameters."""
        if c is None:
            return None
        if not isinstance(c, dict) or not {"t_white", "damping", "active", "step"} <= set(c):
            raise ValueError("state['cache'] must be None or hold t_white, damping, active and step")
        active = c["active"]
        if (not isinstance(active, (list, tuple)) or not active
                or not all(isinstance(i, int) and 0 <= i < len(self._params) for i in active)):
            raise ValueError(f"state['cache']['active'] must list indices of this KWNG's {len(self._params)} "
                             f"parameters; got {active!r}: the state comes from other parameters")
        q = sum(self._params[i].numel() for i in active)
        tw, dmp = c["t_white"], c["damping"]
        if (not isinstance(tw, torch.Tensor) or tw.ndim != 2 or not 1 <= tw.shape[0] <= self.num_basis
                or tw.shape[1] != q or not tw.is_floating_point()):
            got = tuple(tw.shape) if isinstance(tw, torch.Tensor) else type(tw).__name__
            raise ValueError(f"state['cache']['t_white'] must be a floating (M, q) tensor with M <= "
                             f"num_basis = {self.num_basis} and q = {q} (the cached parameters' size); got "
                             f"{got}: the state comes from other parameters")
        if dmp is not None and (not isinstance(dmp, torch.Tensor) or tuple(dmp.shape) != (q,)):
            raise ValueError(f"state['cache']['damping'] must be None or a ({q},) tensor")
        cache_step = _state_count(c["step"], "cache.step")
        if cache_step > step:
            raise ValueError(f"state['cache']['step'] = {cache_step} is after state['step'] = {step}")
        dev = self._params[0].device
        return _Refresh(tw.to(dev), None if dmp is None else dmp.to(dev), tuple(active), cache_step)

    def __repr__(self) -> str:
        q = sum(p.numel() for p in self._params)
        def show(h):
            return getattr(h, "__name__", "schedule") if callable(h) else repr(h)
        return (f"KWNG(params={len(self._params)} tensors, q={q}, num_basis={self.num_basis}, "
                f"eps={show(self.eps)}, lam={show(self.lam)}, damping={self.damping!r}, "
                f"kernel={self.kernel!r}, "
                f"adaptive_eps={self.adaptive_eps}, clip_norm={show(self.clip_norm)}, "
                f"refresh_every={self.refresh_every}, accumulation_steps={self.accumulation_steps}, "
                f"step={self._step})")


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all ``i``, as one fused launch where torch has it."""
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


def _clipped(w: torch.Tensor, gw: float, norm: float, clip: float | None) -> tuple[torch.Tensor, float]:
    """``w`` scaled down to norm ``clip`` if longer, and ``⟨g, w⟩`` with it."""
    if clip is None or norm <= clip:
        return w, gw
    return w * (clip / norm), gw * (clip / norm)


def _fits(w: torch.Tensor, grads: list[torch.Tensor]) -> bool:
    """Whether ``w``'s entries fit the narrowest ``.grad`` dtype (float16's 65504); one host read,
    only where a gradient is narrower than ``w``."""
    limit = min(torch.finfo(p.dtype).max for p in grads)
    if limit >= torch.finfo(w.dtype).max:
        return True
    return float(w.abs().max()) <= limit


def _dot_and_norm(g: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """``⟨g, w⟩`` and ``‖w‖`` (accumulated in float64: a long step never overflows), one host read.
    A non-finite entry of ``w`` makes both non-finite."""
    both = torch.stack([torch.dot(g, w).double(), torch.linalg.vector_norm(w, dtype=torch.float64)])
    gw, norm = both.tolist()
    return gw, norm


def _state_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"state['{name}'] must be an int >= 0; got {value!r}")
    return int(value)


def _state_real(value, name: str, none_ok: bool = True) -> float | None:
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"state['{name}'] must be a number{' or None' if none_ok else ''}; got {value!r}")
    return float(value)

"""KWNG's ``sync_free`` step: the same estimator with nothing read back to the host.

The default step reads the device a few times (the whitening's ``max |C Cᵀ|``, the eigen-
decompositions' status, the step's statistics): each read waits for the GPU to drain its queue, and
the host's next launches then find it idle (``docs/benchmarks.md``: one read costs 5–7 ms of the
seed's ResNet-18 step on an H100). Here:

- the ``M × M`` eigen-decompositions become Cholesky factors of the matrix plus a relative jitter
  (``torch.linalg.cholesky_ex``, which leaves its status on the device), the first of two jitters
  that factorises, chosen on the device (:func:`cholesky_inverse`);
- the whitening takes ``C Cᵀ`` in float64 (:func:`whitening_factor`): ``T̃ᵀT̃ = Tᵀ(CCᵀ + δI)⁻¹T``
  with ``δ = M·eps`` of the work dtype relative to ``max |CCᵀ|`` — the eigen-decomposition's cut
  (``whiten``'s ``rcond``), as a jitter: a direction with eigenvalue ``σ`` keeps the weight
  ``σ/(σ + δ)`` instead of 1 above the cut and 0 below;
- the dual solver keeps its orthonormal basis (two Cholesky passes, CholeskyQR2) and solves the
  ``M × M`` system ``(B + ε/τ² I)`` by a Cholesky factor at each solve (:class:`CholeskySolver`);
- the reduction-ratio rule, ``ε``'s factor and the counters live in one float64 vector on the
  device (:class:`DeviceState`), read when the host asks (``current_eps``, ``num_fallbacks``,
  ``state_dict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from array_api_compat import array_namespace

from .._backend import pow2_below_array
from ..solve import WhitenedSolver, _gram, _orthonormal_rows
from ._state import _Ratio

__all__ = ["CholeskySolver", "DeviceState", "cholesky_inverse", "factorize", "whitening_factor"]


def cholesky_inverse(a: torch.Tensor, jitters: tuple[float, ...]) -> torch.Tensor:
    """``L⁻¹`` ``(M, M)`` for ``a + δ I = L Lᵀ`` with ``a`` symmetric ``(M, M)`` float64 (largest entry
    near 1), ``δ`` the first of ``jitters`` whose factorisation succeeds, chosen on the device (the
    last one if none does: NaN in ``a`` gives NaN). All are factorised in one batched call."""
    m = a.shape[0]
    eye = torch.eye(m, dtype=a.dtype, device=a.device)
    chol, info = torch.linalg.cholesky_ex(torch.stack([a + d * eye for d in jitters]))
    inv = torch.linalg.solve_triangular(chol, eye.expand(len(jitters), m, m), upper=False)
    out = inv[-1]
    for k in range(len(jitters) - 2, -1, -1):
        out = torch.where(info[k] == 0, inv[k], out)
    return out


def _jitters(dtype: torch.dtype, m: int) -> tuple[float, float]:
    """``(M·eps, sqrt(eps))`` of ``dtype``: the eigen-decomposition's cut, then a jitter above any
    rounding of a Gram matrix computed in ``dtype``."""
    eps = float(torch.finfo(dtype).eps)
    return m * eps, math.sqrt(eps)


def whitening_factor(cc: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """The ``M × M`` factor ``F`` of the whitening, ``T̃ = F · (scale · T)``, in ``dtype``: ``F = L⁻¹/√c``
    with ``cc/c + δI = LLᵀ`` (float64), ``c = max |cc|`` and the jitter of :func:`cholesky_inverse`
    (``δ = M·eps`` of ``dtype``). So ``T̃ᵀT̃ = scale² Tᵀ(cc + cδI)⁻¹T``. Reads nothing; a non-finite
    ``cc`` gives a non-finite factor (the step then falls back to ``g``), a zero ``cc`` a finite one."""
    cc = cc.to(torch.float64)
    c = torch.amax(torch.abs(cc))
    c = torch.where(c > 0, c, 1.0)
    inv = cholesky_inverse((cc + cc.T) / (2 * c), _jitters(dtype, cc.shape[0]))
    return (inv * (scale / torch.sqrt(c))).to(dtype)


def _inverse_root(xp, gram, tiny: float):
    """``P = L⁻ᵀ/√c`` with ``Pᵀ gram P = I`` up to the jitter ``tiny`` (``gram/c + tiny·I = LLᵀ``):
    :func:`~wngkernels.solve._orthonormal_rows`'s inverse root without an eigen-decomposition."""
    g = gram.to(torch.float64)
    c = torch.amax(torch.abs(g))
    c = torch.where(c > 0, c, 1.0)
    inv = cholesky_inverse((g + g.T) / (2 * c), (tiny, math.sqrt(tiny / gram.shape[0])))
    return (inv.T / torch.sqrt(c)).to(gram.dtype)


@dataclass(frozen=True)
class CholeskySolver(WhitenedSolver):
    """:class:`~wngkernels.WhitenedSolver`'s dual form with ``values`` holding ``B = (SQ)ᵀ(SQ)``
    ``(M, M)`` (float64) rather than its eigenvalues, and ``factor`` the second pass's ``w`` (``Q =
    span·w``): each solve factorises ``B + (ε/τ²)I`` (Cholesky, on the device) instead of dividing
    by ``μ + ε/τ²``.

    ``pending``: on CUDA, whether any parameter is excluded, copied to pinned host memory without
    blocking, and the event that marks the copy done (:meth:`settled`)."""

    pending: Any = None

    def settled(self) -> CholeskySolver:
        """This solver without the unseen-parameter rule once the device has told, without a wait
        (``pending``'s event has completed), that no parameter is excluded: steps between refreshes
        then skip the rule's passes. Unchanged until then, or where some parameter is excluded."""
        if self.pending is None or not self.pending[1].query():
            return self
        excluded = self.excluded if bool(self.pending[0]) else None
        return replace(self, excluded=excluded, pending=None)

    def _inner(self, xp, z, e):
        b = self.values
        m = b.shape[0]
        e = torch.as_tensor(e, dtype=b.dtype, device=b.device)
        jit = m * float(torch.finfo(b.dtype).eps) * torch.amax(torch.abs(b))
        # B is a Gram matrix (PSD up to rounding): the second factorisation, with e raised above that
        # rounding, serves where ε/τ² is below it
        eye = torch.eye(m, dtype=b.dtype, device=b.device)
        chol, info = torch.linalg.cholesky_ex(torch.stack([b + e * eye, b + (e + jit) * eye]))
        rhs = z.to(b.dtype)[None, :, None].expand(2, m, 1)
        y = torch.linalg.solve_triangular(chol, rhs, upper=False)
        x = torch.linalg.solve_triangular(chol.mT, y, upper=True)[..., 0]
        return torch.where(info[0] == 0, x[0], x[1]).to(z.dtype)


def factorize(t_white: torch.Tensor, damping: torch.Tensor | None, s_bound=None) -> CholeskySolver:
    """``(T̃ᵀT̃ + ε D⁻¹)⁻¹`` for every ``ε``, factorised without a read: ``S = T̃ D^{1/2}/τ`` (``τ`` a power
    of two near ``max |S|``, from ``s_bound`` where given), ``Q`` from two Cholesky passes over
    ``M × M`` Gram matrices, ``B = (SQ)ᵀ(SQ)`` in float64. A zero entry of ``damping`` excludes its
    parameter (the unseen-parameter rule, branch-free, is always applied)."""
    xp = array_namespace(t_white)
    root = None if damping is None else torch.sqrt(damping.to(t_white.dtype))
    if s_bound is not None:
        top = s_bound
    elif root is None:
        top = torch.amax(torch.abs(t_white))
    else:
        top = torch.amax(torch.amax(torch.abs(t_white), dim=0) * root)
    tau = pow2_below_array(xp, top).to(t_white.dtype)
    s = t_white / tau if root is None else t_white * (root / tau)[None, :]
    rows, w = _orthonormal_rows(xp, s, inverse_root=_inverse_root)
    b = (_gram(xp, s, rows) @ w).to(torch.float64)  # S Q (M, M)
    excluded = pending = None
    if damping is not None:
        excluded = damping == 0
        if excluded.device.type == "cuda":  # read later, once it is there: no wait
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(excluded.any(), non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            pending = (flag, done)
    return CholeskySolver(w, b.T @ b, root, rows.T, excluded, tau, pending)


#: The slots of :class:`DeviceState`'s vector.
PREV_LOSS, PREV_GW, PREV_LR, R_MAX, COUNT, EPS_SCALE, FALLBACKS, SKIPPED = range(8)


class DeviceState:
    """The reduction-ratio rule's memory (:class:`~wngkernels.torch._state._Ratio`), ``ε``'s adapted
    factor and the step's counters as one float64 vector on the device (``None`` as NaN): the
    ``sync_free`` step updates it with ``torch.where`` and never reads it; :meth:`read` does, once.

    Parameters
    ----------
    ratio : _Ratio
    eps_scale : float
    device : torch.device
    """

    def __init__(self, ratio: _Ratio, eps_scale: float, device: torch.device):
        def num(v):
            return math.nan if v is None else float(v)
        host = torch.tensor([num(ratio.prev_loss), num(ratio.prev_gw), num(ratio.prev_lr), ratio.r_max,
                             float(ratio.count), eps_scale, 0.0, 0.0], dtype=torch.float64)
        if device.type == "cuda":  # pinned, without blocking: a pageable copy waits for the queue
            host = host.pin_memory()
        self.values = host.to(device, non_blocking=True)

    @classmethod
    def wrapping(cls, values: torch.Tensor) -> DeviceState:
        """A state whose vector is ``values`` itself (a CUDA graph's buffer, or a scratch copy)."""
        state = cls.__new__(cls)
        state.values = values
        return state

    def eps(self, base, bounds: tuple[float, float]) -> torch.Tensor:
        """``ε`` for this step (0-d float64): ``base`` times the adapted factor, within ``bounds``."""
        return torch.clamp(base * self.values[EPS_SCALE], bounds[0], bounds[1])

    def observe(self, loss_now: torch.Tensor, g_ok: torch.Tensor, base, factor: float,
                bounds: tuple[float, float], window: int) -> None:
        """:meth:`_Ratio.observe` and ``KWNG._adapt`` on the device: the ratio of ``loss_now`` joins the
        window where it is defined (and ``g`` finite: a skipped step changes nothing); a full window
        moves ``ε``. ``base`` (the schedule's ``ε``) is a float or a 0-d tensor. In place."""
        v = self.values
        r = 2.0 * (v[PREV_LOSS] - loss_now) / (v[PREV_LR] * v[PREV_GW])
        valid = g_ok & (v[PREV_GW] > 0) & (v[PREV_LR] > 0) & torch.isfinite(r)  # NaN (None) fails
        r_max = torch.where(valid, torch.maximum(v[R_MAX], r), v[R_MAX])
        count = v[COUNT] + valid.to(v.dtype)
        close = valid & (count >= window)
        eps = self.eps(base, bounds)
        moved = torch.where(r_max < 0.25, eps / factor, torch.where(r_max > 0.75, eps * factor, eps))
        scale = torch.clamp(moved, bounds[0], bounds[1]) / base
        v[R_MAX:FALLBACKS] = torch.stack([torch.where(close, -math.inf, r_max),
                                          torch.where(close, 0.0, count),
                                          torch.where(close, scale, v[EPS_SCALE])])

    def record(self, loss_now: torch.Tensor | None, gw: torch.Tensor, lr, g_ok: torch.Tensor,
               fell_back: torch.Tensor) -> None:
        """:meth:`_Ratio.record` and the counters, where ``g`` was finite; else one more skipped step.
        ``lr`` is a float, ``None`` or a 0-d tensor (NaN for none). In place."""
        v = self.values
        def filled(x):  # a fill on the device, not a copy of a host number (that waits for the queue)
            return torch.full((), x, dtype=v.dtype, device=v.device)
        if not isinstance(lr, torch.Tensor):
            lr = filled(math.nan if lr is None else float(lr))
        new = torch.stack([filled(math.nan) if loss_now is None else loss_now.to(v.dtype),
                           gw.to(v.dtype), lr.to(v.dtype)])
        v[:R_MAX] = torch.where(g_ok, new, v[:R_MAX])
        v[FALLBACKS:] += torch.stack([g_ok & (fell_back > 0), ~g_ok]).to(v.dtype)

    def read(self) -> tuple[_Ratio, float, int, int]:
        """The ratio rule's memory, ``ε``'s factor, and the fallbacks and skipped steps counted here
        (one read)."""
        v = self.values.tolist()
        def opt(x):
            return None if math.isnan(x) else x
        ratio = _Ratio(opt(v[PREV_LOSS]), opt(v[PREV_GW]), opt(v[PREV_LR]), v[R_MAX], int(v[COUNT]))
        return ratio, v[EPS_SCALE], int(v[FALLBACKS]), int(v[SKIPPED])

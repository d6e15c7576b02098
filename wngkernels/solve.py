r"""Solving the whitened KWNG system: whitening, damping, and ``(T̃ᵀT̃ + ε D⁻¹)⁻¹ g``.

See :mod:`wngkernels.estimator` for the notation; ``docs/accuracy.md`` measures the forms.

**Scale.** Every step is invariant to the scale of its inputs: :func:`~wngkernels.whiten` divides
``CCᵀ + λK`` by its largest entry before the eigen-decomposition, :func:`~wngkernels.factorize_whitened`
divides ``S = T̃ D^{1/2}`` by its largest entry before forming a Gram matrix, and
:func:`~wngkernels.damping_from_whitened` takes column norms with a per-column scale. So nothing over- or
underflows before the result would: inputs scaled by ``s`` with ``ε`` scaled by ``s²`` give the
direction divided by ``s²`` to the dtype's precision, for any ``s`` the dtype holds.

**Half precision.** ``float16`` and ``bfloat16`` inputs are computed in ``float32`` and the
results cast back; a result beyond the half-precision range is refused with a ``ValueError``.

**Finiteness.** ``cc``, ``k``, ``grad`` and ``damping`` are checked (a ``ValueError`` naming
them). ``t`` and ``t_white`` are not: a non-finite ``T`` gives non-finite rows of ``T̃`` and a
non-finite direction (or the backend's ``LinAlgError`` from the eigen-decomposition), which the
PyTorch preconditioner detects to fall back to ``g``. :func:`~wngkernels.kwng_direction`
checks its ``T`` (from a finite Jacobian or VJP), so it never returns a non-finite direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import _backend

__all__ = [
    "DAMPING_FLOOR",
    "UNSEEN_SHARE",
    "WhitenedSolver",
    "damping_from_whitened",
    "factorize_whitened",
    "solve_whitened",
    "whiten",
]


def _eps_floor(xp, dtype) -> float:
    return float(xp.finfo(dtype).eps)


def _cast_back(xp, a, dtype, name: str):
    """``a`` in ``dtype``; a ``ValueError`` naming ``name`` if the cast overflows (half precision)."""
    if a.dtype == dtype:
        return a
    with _backend.ignore_overflow():
        out = xp.astype(a, dtype)
    if bool(xp.any(xp.isinf(out) & xp.isfinite(a))):
        raise ValueError(f"{name} overflows {dtype}: its entries reach {_backend.max_abs(xp, a):.3g}; "
                         "use float32 or float64")
    return out


def _norm(xp, v, axis=None):
    """Euclidean norm along ``axis`` without over- or underflow: ``m · ‖v/m‖``, ``m = max |v|``."""
    m = xp.max(xp.abs(v), axis=axis)
    safe = xp.where(m > 0, m, 1.0)
    r = v / (safe if axis is None else xp.expand_dims(safe, axis=axis))
    return m * xp.sqrt(xp.sum(r * r, axis=axis))


def _column_norms(xp, a):
    """``‖a[:, j]‖`` for every column of ``a`` ``(M, q)``, without over- or underflow.

    The plain sum of squares (two passes over ``a``) where it is exact to rounding: every norm
    finite and at least ``sqrt(M·tiny/eps)`` (``tiny`` the smallest normal number; below it, squares
    of entries under ``sqrt(tiny)`` may have been lost, and a column of such entries would read as
    zero). Otherwise — one scalar read decides — every column is taken with its own scale
    (:func:`_norm`, about four times the passes), as are exactly zero columns.
    """
    with _backend.ignore_overflow():  # an overflowed square sends the column to the scaled path
        n = xp.sqrt(xp.sum(a * a, axis=0))
    info = xp.finfo(a.dtype)
    low = math.sqrt(a.shape[0] * float(info.smallest_normal) / float(info.eps))
    if bool(xp.all(xp.isfinite(n) & (n >= low))):
        return n
    return _norm(xp, a, axis=0)


def whiten(cc, t, *, k=None, lam: float = 0.0, rcond: float | None = None, scale: float = 1.0):
    r"""Whitened :math:`\tilde T = \Sigma^{\dagger 1/2} V^\top T`.

    Here :math:`CC^\top + \lambda K = V\Sigma V^\top` (one symmetric eigen-decomposition, of the
    matrix divided by its largest entry: any scale of ``cc`` is safe).

    :math:`\tilde T^\top \tilde T = T^\top (CC^\top + \lambda K)^\dagger T = \hat G`.

    Parameters
    ----------
    cc : array, shape (M, M)
        :math:`CC^\top` (:func:`cc_gram`); finite.
    t : array, shape (M, q)
        :math:`T` (:func:`t_matrix`). Not checked for finiteness: non-finite entries give
        non-finite rows of the result (see the module notes).
    k : array, shape (M, M), optional
        :math:`K` (:func:`k_gram`); required when ``lam > 0``; finite.
    lam : float
        RKHS regularisation :math:`\lambda \ge 0`.
    rcond : float, optional
        Relative cut-off ``>= 0``: eigenvalues ``<= rcond · max`` count as zero. Default
        ``M · eps`` of the dtype (``eps = 2.2e-16`` in float64, ``1.2e-7`` in float32),
        the level below which an eigenvalue of a computed Gram matrix is rounding noise.
    scale : float
        A positive factor applied to ``t`` (``T̃`` of ``scale · T``), folded into the ``M × M``
        factor so that the long matrix is read once (a normalisation such as ``1/N``).

    Returns
    -------
    array, shape (M, q)
        Rows of cut directions are zero; all zero if ``cc + lam · k`` is zero. In the dtype of
        the inputs (half precision is computed in ``float32``).

    Raises
    ------
    ValueError
        If ``cc`` or ``k`` holds NaN or Inf, a shape is wrong, ``lam``, ``rcond`` or ``scale`` is out
        of range, or ``k`` is missing while ``lam > 0``.
    TypeError
        If an argument is not an array, or a scalar is not a real number.
    """
    xp = _backend.namespace(cc, t, k, names=("cc", "t", "k"))
    lam = _backend.check_positive_scalar(lam, "lam", allow_zero=True)
    scale = _backend.check_positive_scalar(scale, "scale")
    if rcond is not None:
        rcond = _backend.check_positive_scalar(rcond, "rcond", allow_zero=True)
    if cc.ndim != 2 or cc.shape[0] != cc.shape[1]:
        raise ValueError(f"cc must be square (M, M); got shape {tuple(cc.shape)}")
    m = cc.shape[0]
    if t.ndim != 2 or t.shape[0] != m:
        raise ValueError(f"t must have shape (M, q) with M = {m}; got {tuple(t.shape)}")
    if lam > 0 and (k is None or tuple(k.shape) != (m, m)):
        raise ValueError(f"lam > 0 needs k of shape ({m}, {m}); got {None if k is None else tuple(k.shape)}")
    return _whiten(xp, cc, t, k, lam, rcond, scale)


def _whiten(xp, cc, t, k, lam: float, rcond: float | None, scale: float):
    """:func:`whiten` on validated arguments (shapes and scalars checked; values read here)."""
    out = _backend.result_float_dtype(xp, cc, t)
    work = _backend.work_dtype(xp, out)
    t = t if t.dtype == work else xp.astype(t, work)  # (M, q): no copy unless half precision
    factor = _whitening_factor(xp, cc, k, lam, rcond, scale, work)
    if factor is None:  # no information at all: every direction is cut
        return xp.zeros((cc.shape[0], t.shape[1]), dtype=out, device=_backend.device(t))
    # the M × M factor first: one pass over the (M, q) matrix
    return _cast_back(xp, factor @ t, out, "t_white")


def _whitening_factor(xp, cc, k, lam: float, rcond: float | None, scale: float, work):
    """The ``M × M`` factor ``scale · Σ^{†1/2} Vᵀ`` of :func:`whiten` (``T̃ = factor · T``), in ``work``;
    ``None`` where ``cc + lam · k`` is zero. Reads ``max |cc|`` (and ``max |k|``): ``ValueError`` if
    either is not finite. ``T̃`` is linear in ``T``, so the factor may as well be applied to whatever
    ``T`` is linear in (the PyTorch preconditioner whitens the cotangents of its backward)."""
    m = cc.shape[0]
    cc = cc if cc.dtype == work else xp.astype(cc, work)
    c_cc = _backend.max_abs(xp, cc)
    if not math.isfinite(c_cc):
        raise ValueError("cc must be finite; it contains NaN or Inf")
    c_k = 0.0
    if lam > 0:
        k = k if k.dtype == work else xp.astype(k, work)
        c_k = _backend.max_abs(xp, k)
        if not math.isfinite(c_k):
            raise ValueError("k must be finite; it contains NaN or Inf")
    c_lk = lam * c_k
    if not math.isfinite(c_lk):
        raise ValueError(f"lam · max|k| overflows: lam={lam!r}, max|k|={c_k:.3g}")
    top = max(c_cc, c_lk)
    if top == 0:
        return None
    c = _backend.pow2_below(top)
    a = cc / c
    if c_lk > 0:
        a = a + (k / c_k) * (c_lk / c)  # both factors <= 2: no overflow whatever lam and the scales
    rcond = m * _eps_floor(xp, work) if rcond is None else rcond
    sigma, v = xp.linalg.eigh((a + a.T) / 2)
    keep = sigma > rcond * xp.max(sigma)
    inv_sqrt = xp.where(keep, 1.0 / xp.sqrt(xp.where(keep, sigma, 1.0)), 0.0) * (scale / math.sqrt(c))
    return inv_sqrt[:, None] * v.T


#: The authors' guard in ``D_jj = 1/(‖T̃_j‖ + floor)`` (their code's ``1e-8``), in the units of ``T̃``.
DAMPING_FLOOR = 1e-8


def damping_from_whitened(t_white, *, floor: float = DAMPING_FLOOR):
    r"""The Jacobian-norm damping :math:`D_{jj} = 1/(\lVert \tilde T_{:,j}\rVert + \delta)`.

    That is :math:`D = \mathrm{diag}(\hat G)^{-1/2}` with the authors' absolute guard
    :math:`\delta` = ``floor``: the per-parameter gain is capped at ``1/floor``, so every
    column with a norm far below ``floor`` — in an ill-conditioned network these are the
    directions the preconditioning exists for — gets the same gain. ``floor`` is absolute, in
    the units of :math:`\tilde T` (outputs per unit of parameter), as in the authors' code:
    a guard relative to the largest norm flattens exactly those columns (mathematics page,
    "Damping").

    A column that is exactly zero belongs to a parameter the outputs do not depend on: the
    metric says nothing about it, and ``1/floor`` would let it take over the step. Its entry
    is ``0``, which the solver reads as *excluded*: the parameter is left out of the solve
    and takes the gradient step of the unseen-parameter rule (:class:`WhitenedSolver`).

    Parameters
    ----------
    t_white : array, shape (M, q)
        :func:`whiten`'s output.
    floor : float
        The guard :math:`\delta > 0`; default :data:`~wngkernels.solve.DAMPING_FLOOR` (``1e-8``).

    Returns
    -------
    array, shape (q,)
        ``1/(‖T̃_j‖ + floor)`` where the column is non-zero, ``0`` where it is zero (or not
        finite: such a column carries no usable information either). The norms are taken with
        a per-column scale, so no column of any magnitude is mistaken for zero or infinite.
    """
    xp = _backend.namespace(t_white, names=("t_white",))
    floor = _backend.check_positive_scalar(floor, "floor")
    if t_white.ndim != 2:
        raise ValueError(f"t_white must be 2-D (M, q); got shape {tuple(t_white.shape)}")
    return _damping_from_whitened(xp, t_white, floor)


def _damping_from_whitened(xp, t_white, floor: float):
    """:func:`damping_from_whitened` on a validated ``(M, q)`` ``t_white`` and ``floor``."""
    out = _backend.result_float_dtype(xp, t_white)
    work = _backend.work_dtype(xp, out)
    t_white = t_white if t_white.dtype == work else xp.astype(t_white, work)
    return _damping_of_norms(xp, _column_norms(xp, t_white), floor, out)


def _damping_of_norms(xp, norms, floor: float, out):
    """``1/(n + floor)`` where the column norm ``n > 0``, ``0`` elsewhere (zero or NaN), in ``out``:
    :func:`damping_from_whitened` from norms taken elsewhere (the PyTorch preconditioner's are
    accumulated in float64, exact without a read)."""
    # 1/(n + floor) <= 1/floor: representable for any floor the dtype holds
    inv = 1.0 / (xp.where(norms > 0, norms, 1.0) + floor)
    return xp.astype(xp.where(norms > 0, inv, 0.0), out)


_FORMS = ("auto", "primal", "dual", "dual-qr")


#: Length of the blocks of the long axis in :func:`_gram` (the fastest of 2¹⁰–2¹⁸ on an H200).
_GRAM_BLOCK = 4096


def _gram(xp, a, b=None):
    """``a bᵀ`` ``(M, P)`` for wide ``a`` ``(M, q)`` and ``b`` ``(P, q)`` (default ``b = a``).

    The long axis is cut into blocks of ``_GRAM_BLOCK``: one batched product gives each block's
    ``(M, P)`` product, and a sum over the blocks adds them. It is the same sum in another order
    (partial sums of ``_GRAM_BLOCK`` terms, then a sum over the blocks), but a plain product of such skinny
    matrices runs far below the memory bandwidth on GPUs (an ``(5, 1.1·10⁷)`` float32 Gram: 0.86 ms
    plain, 0.17 ms blocked, where one read of ``a`` takes 0.05 ms; ``docs/benchmarks.md``). The blocks
    are views: nothing is copied when ``a`` and ``b`` are row-major.
    """
    b = a if b is None else b
    m, q = a.shape
    nb = q // _GRAM_BLOCK
    if nb < 2:
        return a @ b.T
    cut = nb * _GRAM_BLOCK
    ab = xp.permute_dims(xp.reshape(a[:, :cut], (m, nb, _GRAM_BLOCK)), (1, 0, 2))  # (nb, M, r)
    bb = xp.permute_dims(xp.reshape(b[:, :cut], (b.shape[0], nb, _GRAM_BLOCK)), (1, 2, 0))  # (nb, r, P)
    out = xp.sum(ab @ bb, axis=0)
    return out if cut == q else out + a[:, cut:] @ b[:, cut:].T


def _inverse_root(xp, gram, tiny: float):
    """``U Λ^{-1/2}`` for ``gram = U Λ Uᵀ``, with zero columns where ``λ <= tiny·max λ`` (cut)."""
    lam, u = xp.linalg.eigh(gram)
    keep = lam > tiny * xp.max(lam)
    return u * xp.where(keep, 1.0 / xp.sqrt(xp.where(keep, lam, 1.0)), 0.0)[None, :]


def _orthonormal_rows(xp, a, inverse_root=_inverse_root):
    """Rows ``a₁`` ``(M, q)`` and ``w`` ``(M, M)`` such that ``Q = a₁ᵀ w`` has orthonormal columns
    spanning the row space of ``a`` (the range of ``aᵀ``), from ``M × M`` Gram matrices.
    ``inverse_root(gram, tiny)`` gives ``P`` with ``Pᵀ gram P = I`` on the kept directions (default
    the eigen-decomposition's ``U Λ^{-1/2}``; the PyTorch preconditioner's ``sync_free`` mode passes
    a Cholesky factor's inverse, which reads nothing back).

    The first pass eigen-decomposes ``a aᵀ = U Λ Uᵀ`` and maps ``a₁ = Λ^{-1/2} Uᵀ a`` (directions
    with ``λ <= M·eps·max λ`` become zero rows); it leaves a loss of orthogonality of about
    ``eps·κ(a)²``. The second pass (the idea of CholeskyQR2) takes ``w = U₁ Λ₁^{-1/2}`` from
    ``a₁ a₁ᵀ = U₁ Λ₁ U₁ᵀ``: then ``QᵀQ = I`` to rounding, because ``a₁`` is well conditioned. It is
    not applied to the long rows: callers fold ``w`` into their ``M × M`` factors, which saves a
    pass over ``(M, q)``. Unlike a Cholesky factor, the eigen-decomposition accepts rank-deficient
    input, and only matrix products touch the long axis (on GPUs a Householder QR of a tall matrix
    runs one column at a time). The rows stay row-major: the blocked Gram and the
    ``(M × M)·(M × q)`` map are fastest that way.
    """
    tiny = a.shape[0] * _eps_floor(xp, a.dtype)
    a1 = inverse_root(xp, _gram(xp, a), tiny).T @ a
    return a1, inverse_root(xp, _gram(xp, a1), tiny)


#: The largest share of the step's norm that excluded (unseen) parameters may take.
UNSEEN_SHARE = 0.5


def _unseen_step(xp, w, grad, excluded):
    r"""The rule for parameters excluded from the solve (``D_jj = 0``: the outputs do not see them).

    ``w`` is the solved direction with them frozen (``w_U = 0``). They take the gradient step at
    the gain the solve gave the rest, ``w_U = ρ g_U`` with ``ρ = ‖w_S‖ / ‖g_S‖``, so their
    share of the step's norm is their share of the gradient's norm — shortened where needed so
    that it never exceeds :data:`~wngkernels.solve.UNSEEN_SHARE`. ``w_S`` is untouched. Where
    ``g_S = 0`` (nothing else to move) they take ``g_U`` itself. Branch-free: no device
    synchronisation.
    """
    g_u = xp.where(excluded, grad, 0.0)
    w_s, g_s, g_un = _norm(xp, w), _norm(xp, grad - g_u), _norm(xp, g_u)
    rho = xp.where(g_s > 0, w_s / xp.where(g_s > 0, g_s, 1.0), 1.0)
    # share ‖w_U‖/‖w‖ <= s  ⇔  ‖w_U‖ <= ‖w_S‖ · s/√(1 − s²)
    cap = w_s * (UNSEEN_SHARE / math.sqrt(1.0 - UNSEEN_SHARE**2))
    limit = xp.where((g_s > 0) & (g_un * rho > cap), cap / xp.where(g_un > 0, g_un, 1.0), rho)
    return w + limit * g_u


@dataclass(frozen=True)
class WhitenedSolver:
    r"""``g ↦ (T̃ᵀT̃ + ε D⁻¹)⁻¹ g`` for any ``ε``, factorised once (:func:`factorize_whitened`).

    With ``S = T̃ D^{1/2}`` and ``h = D^{1/2} g``, it holds ``V`` with orthonormal columns, a
    scale ``τ`` and ``μ`` such that ``SᵀS = τ² V diag(μ) Vᵀ``; in the dual form the ``M``
    columns of ``V`` span the range of ``Sᵀ``, and
    ``(SᵀS + εI)⁻¹h = τ⁻² V diag(1/(μ + ε/τ²)) Vᵀh [+ ε⁻¹(h − VVᵀh)]``. In the dual form
    ``V = span·F`` is kept as ``span`` ``(q, M)``, a basis of that range, and the ``M × M``
    factor ``F``, never formed: a solve then passes over ``span`` twice (``z = Fᵀ spanᵀh``, then
    ``span [c, Fz]`` in one product), however many parameters there are — what a training loop
    needs between refreshes of ``T̃``, for any ``ε``. ``τ`` (near the largest entry of ``S``) keeps
    every intermediate in range: the direction is accurate whenever it is representable, whatever
    the scale of ``T̃``.

    **Excluded parameters.** Where ``D_jj = 0`` (:func:`damping_from_whitened` gives it to the
    parameters the outputs do not see) the parameter is left out of the solve, then takes the
    gradient step at the solved block's gain, ``w_U = ρ g_U`` with ``ρ = ‖w_S‖/‖g_S‖``, at most
    :data:`~wngkernels.solve.UNSEEN_SHARE` of the step's norm. The metric holds no information about such a
    parameter (its natural gradient is unbounded); this keeps it moving downhill without
    letting it take over the clipped step, and leaves the rest of the direction exactly what
    it would be with the parameter frozen.

    Attributes
    ----------
    factor : array, shape (q, q) or (M, M)
        ``V`` in the primal form; ``F`` in the dual form (``V = span·F``).
    values : array, shape (k,)
        ``μ >= 0``, the eigenvalues of ``SᵀS / τ²``.
    root : array, shape (q,) or None
        ``D^{1/2}`` (zero on excluded parameters); ``None`` for ``D = I``.
    span : array, shape (q, M) or None
        In the dual form, columns spanning the range of ``Sᵀ``: orthonormal ``Q`` from a
        Householder QR (``form="dual-qr"``, ``F`` then a rotation), or, from the Gram passes, the
        first pass's nearly orthonormal basis (the transposed view of row-major ``(M, q)`` rows),
        whose second pass lives in ``F``. ``None`` in the primal form, where ``V`` spans ``R^q``.
    excluded : array of bool, shape (q,), or None
        Where ``D_jj = 0``; ``None`` when no parameter is excluded (the rule is then skipped).
    scale : array, shape ()
        ``τ``: a power of two within a factor 2 of the largest entry of ``S`` (``1`` if ``S`` is
        zero or not finite), left on the device.
    """

    factor: Any
    values: Any
    root: Any
    span: Any
    excluded: Any = None
    scale: Any = 1.0

    @property
    def vectors(self):
        """``V`` ``(q, k)``, orthonormal columns (``k = q`` primal, ``k = M`` dual: formed here as
        ``span·F``, a pass over ``span`` that the solve itself never makes)."""
        return self.factor if self.span is None else self.span @ self.factor

    @property
    def num_params(self) -> int:
        """``q``."""
        return (self.factor if self.span is None else self.span).shape[0]

    def solve(self, grad, eps: float, *, check_finite: bool = True):
        """The direction ``w`` ``(q,)`` for the gradient ``grad`` ``(q,)`` and damping ``eps > 0``.

        Computed in the solver's dtype, returned in ``grad``'s floating dtype. ``w`` is finite
        when ``grad`` and the factorised ``T̃`` are, unless ``eps`` is so small that ``w``
        overflows the dtype (:func:`solve_whitened` checks that; this method, called once per
        training step, reads nothing back but ``grad``'s finiteness).

        Parameters
        ----------
        grad : array, shape (q,)
        eps : float
        check_finite : bool
            Refuse a ``grad`` holding NaN or Inf (one scalar read). A caller that has checked
            ``grad`` already (the PyTorch preconditioner) passes ``False``: the solve then reads
            nothing back, and a non-finite ``grad`` gives a non-finite ``w``.

        Raises
        ------
        ValueError
            If ``grad`` has the wrong shape or (with ``check_finite``) holds NaN or Inf, or
            ``eps`` is not ``> 0``.
        TypeError
            If ``grad`` is not an array of the solver's library, or ``eps`` not a real number.
        """
        xp = _backend.namespace(grad, self.factor, names=("grad", "factor"))
        eps = _backend.check_positive_scalar(eps, "eps")
        _backend.check_shape(grad, "grad", (self.num_params,), "(q,)")
        return self._solve(xp, grad, eps, check_finite)

    def _inner(self, xp, z, e):
        """``(diag(μ) + eI)⁻¹ z``: the ``M × M`` (or ``q × q``) system in the eigenbasis, ``e = ε/τ²``."""
        return z / (self.values + e)

    def _solve(self, xp, grad, eps: float, check_finite: bool):
        """:meth:`solve` on a validated ``grad`` of shape ``(q,)`` and ``eps > 0``."""
        out = _backend.result_float_dtype(xp, grad)
        work = self.factor.dtype
        grad = grad if grad.dtype == work else xp.astype(grad, work)
        if check_finite:
            _backend.require_finite(xp, grad, "grad")
        with _backend.ignore_overflow():  # an overflow (eps too small) is refused by the callers' check
            h = grad if self.root is None else self.root * grad
            tau = self.scale
            # in units of τ²: eps/τ² and μ are moderate whatever the scale of T̃; dividing by τ twice
            # passes through magnitudes between x and w, so nothing overflows that w would not
            f, span = self.factor, self.span
            # z = Vᵀh: V itself (primal), or spanᵀh through the M × M factor (dual: V = span·F)
            # (a plain matrix–vector product: the blocked form of _gram gains nothing for one vector on
            # GPUs, and halves the speed of torch's CPU matrix–vector kernel)
            z = f.T @ (h if span is None else span.T @ h)
            c = f @ self._inner(xp, z, eps / tau / tau) / tau / tau
            if span is None:
                x = c
            else:  # span·c and span·Fz (= VVᵀh) in one pass; h − VVᵀh is the cancellation, then / ε
                both = xp.stack([c, f @ z], axis=0) @ span.T  # spanᵀ row-major in the Gram form
                x = both[0, :] + (h - both[1, :]) / eps
            if self.root is not None:
                x = self.root * x
                if self.excluded is not None:
                    x = _unseen_step(xp, x, grad, self.excluded)
            return x if x.dtype == out else xp.astype(x, out)


def _check_damping(xp, damping, q: int, dtype):
    """``damping`` ``(q,)`` in ``dtype`` and a 0-d flag on the device, not read here: 2 for an invalid
    entry (NaN, Inf, negative), else 1 if an entry is 0, else 0 (:func:`_read_damping_flag`). Two
    passes over ``damping`` (its smallest and largest entries: NaN propagates through both)."""
    if not _backend.in_namespace(damping, xp):
        raise TypeError(f"damping must be an array of t_white's library or None; "
                        f"got {type(damping).__name__}")
    _backend.check_shape(damping, "damping", (q,), "(q,)")
    damping = damping if damping.dtype == dtype else xp.astype(damping, dtype)
    if q == 0:
        return damping, None
    low, high = xp.min(damping), xp.max(damping)
    valid = (low >= 0) & (high < math.inf)  # False for NaN
    return damping, xp.where(valid, xp.astype(low == 0, xp.int32), 2)


def _read_damping_flag(flag) -> bool:
    """Whether an entry of the damping is 0 (one scalar read); ``ValueError`` for an invalid entry.
    :func:`_factorize` reads it after its first decomposition, which waits for the device anyway."""
    value = 0 if flag is None else int(flag)
    if value == 2:
        raise ValueError("damping must be finite and >= 0 everywhere (0 excludes a parameter)")
    return value == 1


def factorize_whitened(t_white, *, damping=None, form: str = "auto") -> WhitenedSolver:
    r"""Factorise ``T̃ᵀT̃ + ε D⁻¹`` once for every ``ε``: a :class:`WhitenedSolver`.

    Parameters
    ----------
    t_white : array, shape (M, q)
        :math:`\tilde T` (:func:`whiten`). Not checked for finiteness (see the module notes).
    damping : array, shape (q,), optional
        The diagonal of ``D``, finite and ``>= 0``; ``None`` for ``D = I``. Zeros exclude
        parameters from the solve (see :class:`WhitenedSolver`).
    form : {"auto", "primal", "dual", "dual-qr"}
        ``"primal"`` eigen-decomposes the ``q × q`` matrix ``SᵀS``. The dual forms take ``Q``
        ``(q, M)`` orthonormal, spanning the range of ``Sᵀ``, and eigen-decompose the ``M × M``
        matrix ``QᵀSᵀSQ``: ``"dual"`` builds ``Q`` from two passes of ``M × M`` Gram
        eigen-decompositions (matrix products only: fast on GPUs; the second pass is kept as an
        ``M × M`` factor, see :class:`WhitenedSolver`), ``"dual-qr"`` from a
        Householder QR (the most accurate on strongly graded ``T̃``, but slow for tall matrices
        on GPUs). ``"auto"`` picks ``"primal"`` when ``q <= M``, else ``"dual"``.
        ``docs/accuracy.md`` measures all of them. ``S`` is divided by its largest entry first
        (one scalar read), so any scale of ``T̃`` is safe.

    Returns
    -------
    WhitenedSolver
        In ``t_white``'s dtype (``float32`` for half-precision input).

    Raises
    ------
    ValueError
        If ``t_white`` is not 2-D, ``damping`` has the wrong shape or an entry that is negative,
        NaN or Inf, or ``form`` is an unknown name.
    TypeError
        If ``form`` is not a string, or an argument is not an array.
    """
    xp = _backend.namespace(t_white, damping, names=("t_white", "damping"))
    if t_white.ndim != 2:
        raise ValueError(f"t_white must be 2-D (M, q); got shape {tuple(t_white.shape)}")
    form = _backend.check_choice(form, "form", _FORMS)
    return _factorize(xp, t_white, damping, form)


def _factorize(xp, t_white, damping, form: str, s_bound=None) -> WhitenedSolver:
    """:func:`factorize_whitened` on a validated 2-D ``t_white`` and ``form`` (``damping``'s type,
    shape and values are checked here: its zeros are read anyway). ``s_bound``: a 0-d bound of
    ``max |S|``, at most a small factor above it (the PyTorch preconditioner's, from the column
    norms it took for the damping), which ``τ`` is then taken from instead of ``S``'s entries."""
    m, q = t_white.shape
    work = _backend.work_dtype(xp, _backend.result_float_dtype(xp, t_white))
    t_white = t_white if t_white.dtype == work else xp.astype(t_white, work)
    root = flag = None
    if damping is not None:
        damping, flag = _check_damping(xp, damping, q, work)
        with _backend.ignore_overflow():  # a negative entry: NaN, refused after the first decomposition
            root = xp.sqrt(damping)
    # τ = max |S| before S is formed, left on the device (nothing is read before the first
    # decomposition): S = T̃ D^{1/2} is then written once, already divided by τ (a power of two: bit
    # for bit what dividing afterwards gives); NaN or Inf in S leaves τ = 1 (see the module notes)
    if q == 0:
        top = xp.zeros((), dtype=work, device=_backend.device(t_white))
    elif s_bound is not None:
        top = s_bound
    elif root is None:
        top = xp.maximum(xp.max(t_white), -xp.min(t_white))
    else:
        top = xp.max(xp.maximum(xp.max(t_white, axis=0), -xp.min(t_white, axis=0)) * root)  # NaN stays NaN
    tau = xp.astype(_backend.pow2_below_array(xp, top), work)
    s = t_white / tau if root is None else t_white * (root / tau)[None, :]
    try:
        if form == "primal" or (form == "auto" and q <= m):
            mu, factor = xp.linalg.eigh(s.T @ s)  # V
            span = w = None
        elif form == "dual-qr":
            span, w = xp.linalg.qr(s.T)[0], None  # Q (q, M)
        else:  # Q = span·w, span the transposed view of row-major rows (M, q)
            rows, w = _orthonormal_rows(xp, s)
            span = rows.T
    except Exception:  # an invalid damping (NaN in S) may fail the decomposition: its ValueError first
        _read_damping_flag(flag)
        raise
    excluded = (damping == 0) if _read_damping_flag(flag) else None
    if span is not None:
        b = _gram(xp, s, span.T)  # (M, M): S·span, then SQ = b w, and QᵀSᵀSQ = bᵀb
        b = b if w is None else b @ w
        mu, u = xp.linalg.eigh(b.T @ b)
        factor = u if w is None else w @ u  # F: V = span·F = QU is never formed
    return WhitenedSolver(factor, xp.where(mu > 0, mu, 0.0), root, span, excluded, tau)


def solve_whitened(t_white, grad, *, eps: float, damping=None, form: str = "auto"):
    r"""``w = (T̃ᵀ T̃ + ε D⁻¹)⁻¹ g`` — the KWNG direction from the whitened ``T̃``.

    ``factorize_whitened(t_white, damping=damping, form=form).solve(grad, eps)``, with the
    checks of both, and one more: a direction that overflows the dtype is refused.

    Parameters
    ----------
    t_white : array, shape (M, q)
        :math:`\tilde T` (:func:`whiten`).
    grad : array, shape (q,)
        The Euclidean gradient ``g``; finite.
    eps : float
        Damping :math:`\varepsilon > 0`.
    damping : array, shape (q,), optional
        The diagonal of ``D``, finite and ``>= 0`` (zeros exclude parameters:
        :class:`WhitenedSolver`); ``None`` for ``D = I``.
    form : {"auto", "primal", "dual", "dual-qr"}
        See :func:`factorize_whitened`.

    Returns
    -------
    array, shape (q,)
        In ``grad``'s floating dtype. Non-finite only where ``t_white`` is (see the module notes).

    Raises
    ------
    ValueError
        If ``grad`` holds NaN or Inf or has the wrong shape, ``eps <= 0``, ``damping`` is invalid
        (see :func:`factorize_whitened`), or the direction overflows the dtype (``eps`` too small
        for this ``grad``).
    TypeError
        If an argument has the wrong type.
    """
    xp = _backend.namespace(t_white, grad, damping, names=("t_white", "grad", "damping"))
    eps = _backend.check_positive_scalar(eps, "eps")
    if t_white.ndim != 2:
        raise ValueError(f"t_white must be 2-D (M, q); got shape {tuple(t_white.shape)}")
    _backend.check_shape(grad, "grad", (t_white.shape[-1],), "(q,)")
    return _solve_whitened(xp, t_white, grad, eps, damping, _backend.check_choice(form, "form", _FORMS))


def _solve_whitened(xp, t_white, grad, eps: float, damping, form: str, check_finite: bool = True):
    """:func:`solve_whitened` on validated arguments (``grad`` ``(q,)``, ``eps > 0``, ``form``);
    ``check_finite=False`` where the caller has checked ``grad``."""
    w = _factorize(xp, t_white, damping, form)._solve(xp, grad, eps, check_finite)
    _check_direction(xp, w, eps, t_white, grad)
    return w


#: A direction whose largest entry is below this many times the dtype's smallest normal number is
#: refused as an underflow (:func:`_check_direction`).
UNDERFLOW_MARGIN = 100.0


def _check_direction(xp, w, eps: float, t_white=None, grad=None) -> None:
    """Refuse a direction that over- or underflowed the dtype: ``ValueError`` (one scalar read).

    A non-finite ``w`` from a non-finite ``t_white`` (when given) passes: see the module notes.
    ``w`` is never zero for a non-zero ``grad`` (``T̃ᵀT̃ + εD⁻¹`` is invertible). Entries below
    the smallest normal number lose precision, and GPUs and XLA flush them to zero: a largest
    entry under ``UNDERFLOW_MARGIN`` times the smallest normal number, where those entries can
    weigh a percent of the direction, is an underflow.
    """
    top = _backend.max_abs(xp, w)
    info = xp.finfo(w.dtype)
    if math.isfinite(top):
        floor = UNDERFLOW_MARGIN * float(info.smallest_normal)
        if top >= floor or grad is None or _backend.max_abs(xp, grad) == 0:
            return
        raise ValueError(
            f"the direction underflows {w.dtype} (its entries are below {floor:.3g}, where subnormal "
            f"entries lose precision or are flushed to zero): eps={eps!r} and the metric are too large "
            "for this gradient; rescale the problem or use a wider dtype"
        )
    if t_white is not None and not math.isfinite(_backend.max_abs(xp, t_white)):
        return
    raise ValueError(
        f"the direction overflows {w.dtype} (its entries exceed {float(info.max):.3g}): eps={eps!r} is "
        "too small for this gradient and metric (w grows like |g|/eps on directions the metric does not "
        "see); use a larger eps or a wider dtype"
    )

r"""Solving the whitened KWNG system: whitening, damping, and ``(T̃ᵀT̃ + ε D⁻¹)⁻¹ g``.

See :mod:`wngkernels.estimator` for the notation; ``docs/accuracy.md`` measures the forms.
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


def whiten(cc, t, *, k=None, lam: float = 0.0, rcond: float | None = None, scale: float = 1.0):
    r"""Whitened :math:`\tilde T = \Sigma^{\dagger 1/2} V^\top T`.

    Here :math:`CC^\top + \lambda K = V\Sigma V^\top` (one symmetric eigen-decomposition).

    :math:`\tilde T^\top \tilde T = T^\top (CC^\top + \lambda K)^\dagger T = \hat G`.

    Parameters
    ----------
    cc : array, shape (M, M)
        :math:`CC^\top` (:func:`cc_gram`).
    t : array, shape (M, q)
        :math:`T` (:func:`t_matrix`).
    k : array, shape (M, M), optional
        :math:`K` (:func:`k_gram`); required when ``lam > 0``.
    lam : float
        RKHS regularisation :math:`\lambda \ge 0`.
    rcond : float, optional
        Relative cut-off: eigenvalues ``<= rcond · max`` count as zero. Default
        ``M · eps`` of the dtype (``eps = 2.2e-16`` in float64, ``1.2e-7`` in float32),
        the level below which an eigenvalue of a computed Gram matrix is rounding noise.
    scale : float
        A positive factor applied to ``t`` (``T̃`` of ``scale · T``), folded into the ``M × M``
        factor so that the long matrix is read once (a normalisation such as ``1/N``).

    Returns
    -------
    array, shape (M, q)
        Rows of cut directions are zero.
    """
    xp = _backend.namespace(cc, t, k, names=("cc", "t", "k"))
    lam = _check_nonneg(lam, "lam")
    m = cc.shape[0]
    if cc.ndim != 2 or cc.shape[1] != m:
        raise ValueError(f"cc must be square (M, M); got shape {tuple(cc.shape)}")
    if t.ndim != 2 or t.shape[0] != m:
        raise ValueError(f"t must have shape (M, q) with M = {m}; got {tuple(t.shape)}")
    a = cc
    if lam > 0:
        if k is None or tuple(k.shape) != (m, m):
            got = None if k is None else tuple(k.shape)
            raise ValueError(f"lam > 0 needs k of shape ({m}, {m}); got {got}")
        a = cc + lam * k
    rcond = m * _eps_floor(xp, a.dtype) if rcond is None else _check_nonneg(rcond, "rcond")
    sigma, v = xp.linalg.eigh((a + a.T) / 2)
    keep = sigma > rcond * xp.max(sigma)
    inv_sqrt = xp.where(keep, _check_positive(scale, "scale") / xp.sqrt(xp.where(keep, sigma, 1.0)), 0.0)
    return (inv_sqrt[:, None] * v.T) @ t  # the M × M factor first: one pass over the (M, q) matrix


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
        ``1/(‖T̃_j‖ + floor)`` where the column is non-zero, ``0`` where it is zero.
    """
    xp = _backend.namespace(t_white, names=("t_white",))
    floor = _check_positive(floor, "floor")
    norms = xp.sqrt(xp.sum(t_white * t_white, axis=0))  # (vector_norm along axis 0 is 10x slower in torch)
    return xp.where(norms > 0, 1.0 / (norms + floor), 0.0)


_FORMS = ("auto", "primal", "dual", "dual-qr")


def _orthonormal_range(xp, a, passes: int = 2):
    """Orthonormal columns spanning the range of ``a`` ``(q, M)``, from ``M × M`` Gram matrices.

    Each pass eigen-decomposes ``aᵀa = U Λ Uᵀ`` and maps ``a ← a U Λ^{-1/2}`` (directions with
    ``λ <= M·eps·max λ`` become zero columns). One pass leaves a loss of orthogonality of about
    ``eps·κ(a)²``; the second pass brings it to rounding level (the idea of CholeskyQR2), and,
    unlike a Cholesky factor, the eigen-decomposition accepts rank-deficient input. Only
    matrix products touch the long axis, so on GPUs this costs a few passes over ``a`` where a
    Householder QR of a tall matrix runs one column at a time.
    """
    m = a.shape[1]
    tiny = m * _eps_floor(xp, a.dtype)
    for _ in range(passes):
        lam, u = xp.linalg.eigh(a.T @ a)
        keep = lam > tiny * xp.max(lam)
        a = a @ (u * xp.where(keep, 1.0 / xp.sqrt(xp.where(keep, lam, 1.0)), 0.0)[None, :])
    return a


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
    w_s, g_s = xp.sqrt(xp.sum(w * w)), xp.sqrt(xp.sum((grad - g_u) ** 2))
    g_un = xp.sqrt(xp.sum(g_u * g_u))
    rho = xp.where(g_s > 0, w_s / xp.where(g_s > 0, g_s, 1.0), 1.0)
    # share ‖w_U‖/‖w‖ <= s  ⇔  ‖w_U‖ <= ‖w_S‖ · s/√(1 − s²)
    cap = w_s * (UNSEEN_SHARE / math.sqrt(1.0 - UNSEEN_SHARE**2))
    limit = xp.where((g_s > 0) & (g_un * rho > cap), cap / xp.where(g_un > 0, g_un, 1.0), rho)
    return w + limit * g_u


@dataclass(frozen=True)
class WhitenedSolver:
    r"""``g ↦ (T̃ᵀT̃ + ε D⁻¹)⁻¹ g`` for any ``ε``, factorised once (:func:`factorize_whitened`).

    With ``S = T̃ D^{1/2}`` and ``h = D^{1/2} g``, it stores ``V`` with orthonormal columns and
    ``μ`` such that ``SᵀS = V diag(μ) Vᵀ``, and in the dual form the orthonormal ``Q`` spanning
    the range of ``Sᵀ``: then ``(SᵀS + εI)⁻¹h = V diag(1/(μ + ε)) Vᵀh [+ ε⁻¹(h − QQᵀh)]``.
    A solve costs a few products with ``V`` (and ``Q``) — what a training loop needs between
    refreshes of ``T̃``, for any ``ε``.

    **Excluded parameters.** Where ``D_jj = 0`` (:func:`damping_from_whitened` gives it to the
    parameters the outputs do not see) the parameter is left out of the solve, then takes the
    gradient step at the solved block's gain, ``w_U = ρ g_U`` with ``ρ = ‖w_S‖/‖g_S‖``, at most
    :data:`~wngkernels.solve.UNSEEN_SHARE` of the step's norm. The metric holds no information about such a
    parameter (its natural gradient is unbounded); this keeps it moving downhill without
    letting it take over the clipped step, and leaves the rest of the direction exactly what
    it would be with the parameter frozen.

    Attributes
    ----------
    vectors : array, shape (q, k)
        ``V`` (``k = q`` in the primal form, ``k = M`` in the dual form).
    values : array, shape (k,)
        ``μ >= 0``.
    root : array, shape (q,) or None
        ``D^{1/2}`` (zero on excluded parameters); ``None`` for ``D = I``.
    span : array, shape (q, M) or None
        ``Q`` in the dual form; ``None`` in the primal form, where ``V`` spans ``R^q``.
    excluded : array of bool, shape (q,), or None
        Where ``D_jj = 0``; ``None`` when no parameter is excluded (the rule is then skipped).
    """

    vectors: Any
    values: Any
    root: Any
    span: Any
    excluded: Any = None

    def solve(self, grad, eps: float):
        """The direction ``w`` ``(q,)`` for the gradient ``grad`` ``(q,)`` and damping ``eps > 0``."""
        xp = _backend.namespace(grad, self.vectors, names=("grad", "vectors"))
        eps = _check_positive(eps, "eps")
        q = self.vectors.shape[0]
        if grad.ndim != 1 or grad.shape[0] != q:
            raise ValueError(f"grad must have shape (q,) = ({q},); got {tuple(grad.shape)}")
        h = grad if self.root is None else self.root * grad
        x = self.vectors @ ((self.vectors.T @ h) / (self.values + eps))
        if self.span is not None:
            x = x + (h - self.span @ (self.span.T @ h)) / eps
        if self.root is None:
            return x
        w = self.root * x
        return w if self.excluded is None else _unseen_step(xp, w, grad, self.excluded)


def factorize_whitened(t_white, *, damping=None, form: str = "auto") -> WhitenedSolver:
    r"""Factorise ``T̃ᵀT̃ + ε D⁻¹`` once for every ``ε``: a :class:`WhitenedSolver`.

    Parameters
    ----------
    t_white : array, shape (M, q)
        :math:`\tilde T` (:func:`whiten`).
    damping : array, shape (q,), optional
        The diagonal of ``D``, ``>= 0``; ``None`` for ``D = I``. Zeros exclude parameters from
        the solve (see :class:`WhitenedSolver`).
    form : {"auto", "primal", "dual", "dual-qr"}
        ``"primal"`` eigen-decomposes the ``q × q`` matrix ``SᵀS``. The dual forms take ``Q``
        ``(q, M)`` orthonormal, spanning the range of ``Sᵀ``, and eigen-decompose the ``M × M``
        matrix ``QᵀSᵀSQ``: ``"dual"`` builds ``Q`` from two passes of ``M × M`` Gram
        eigen-decompositions (matrix products only: fast on GPUs), ``"dual-qr"`` from a
        Householder QR (the most accurate on strongly graded ``T̃``, but slow for tall matrices
        on GPUs). ``"auto"`` picks ``"primal"`` when ``q <= M``, else ``"dual"``.
        ``docs/accuracy.md`` measures all of them.

    Returns
    -------
    WhitenedSolver
    """
    xp = _backend.namespace(t_white, damping, names=("t_white", "damping"))
    if t_white.ndim != 2:
        raise ValueError(f"t_white must be 2-D (M, q); got shape {tuple(t_white.shape)}")
    m, q = t_white.shape
    if form not in _FORMS:
        raise ValueError(f"form must be one of {', '.join(map(repr, _FORMS))}; got {form!r}")
    root = None if damping is None else xp.sqrt(damping)
    excluded = None
    if damping is not None and bool(xp.any(damping == 0)):  # one host check per factorisation
        excluded = damping == 0
    s = t_white if root is None else t_white * root[None, :]
    if form == "primal" or (form == "auto" and q <= m):
        mu, vectors = xp.linalg.eigh(s.T @ s)
        span = None
    else:
        basis = xp.linalg.qr(s.T)[0] if form == "dual-qr" else _orthonormal_range(xp, s.T)  # (q, M)
        b = s @ basis  # (M, M): SQ, so QᵀSᵀSQ = bᵀb
        mu, u = xp.linalg.eigh(b.T @ b)
        vectors, span = basis @ u, basis
    return WhitenedSolver(vectors, xp.where(mu > 0, mu, 0.0), root, span, excluded)


def solve_whitened(t_white, grad, *, eps: float, damping=None, form: str = "auto"):
    r"""``w = (T̃ᵀ T̃ + ε D⁻¹)⁻¹ g`` — the KWNG direction from the whitened ``T̃``.

    ``factorize_whitened(t_white, damping=damping, form=form).solve(grad, eps)``.

    Parameters
    ----------
    t_white : array, shape (M, q)
        :math:`\tilde T` (:func:`whiten`).
    grad : array, shape (q,)
        The Euclidean gradient ``g``.
    eps : float
        Damping :math:`\varepsilon > 0`.
    damping : array, shape (q,), optional
        The diagonal of ``D``, ``>= 0`` (zeros exclude parameters: :class:`WhitenedSolver`);
        ``None`` for ``D = I``.
    form : {"auto", "primal", "dual", "dual-qr"}
        See :func:`factorize_whitened`.

    Returns
    -------
    array, shape (q,)
    """
    _backend.namespace(t_white, grad, damping, names=("t_white", "grad", "damping"))
    eps = _check_positive(eps, "eps")
    q = t_white.shape[-1]
    if grad.ndim != 1 or grad.shape[0] != q:
        raise ValueError(f"grad must have shape (q,) = ({q},); got {tuple(grad.shape)}")
    return factorize_whitened(t_white, damping=damping, form=form).solve(grad, eps)


def _check_positive(value, name):
    return _backend.check_positive_scalar(value, name)


def _check_nonneg(value, name) -> float:
    return _backend.check_positive_scalar(value, name, allow_zero=True)

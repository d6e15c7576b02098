r"""The KWNG estimator (DESIGN §2): cotangents, :math:`CC^\top`, :math:`K`, :math:`T`, the solve.

Notation: samples :math:`X` ``(N, d)``; a Nyström basis of ``M`` pairs
:math:`(Y_m, i_m)`; parameters :math:`\theta \in \mathbb{R}^q`.

.. math::

    C_{m,(n,i)} &= N^{-1/2}\,\partial_{x_{i_m}}\partial_{y_i} k(Y_m, X_n), \\
    K_{m,m'} &= \partial_{x_{i_m}}\partial_{y_{i_{m'}}} k(Y_m, Y_{m'}), \\
    T_{m,:} &= N^{-1}\textstyle\sum_{n,i} \partial_{x_{i_m}}\partial_{y_i} k(Y_m, X_n)\,
              \nabla_\theta h_\theta(Z_n)_i, \\
    \hat G &= T^\top (CC^\top + \lambda K)^\dagger T, \qquad
    w = (\hat G + \varepsilon D^{-1})^{-1} g .

**Whitening.** :math:`CC^\top + \lambda K = V\Sigma V^\top` is decomposed once; eigenvalues at
or below ``rcond · max(Σ)`` are cut (the pseudo-inverse), and
:math:`\tilde T = \Sigma^{\dagger 1/2} V^\top T` gives :math:`\hat G = \tilde T^\top\tilde T`.
For :math:`\lambda = 0` this is the ridgeless form of the seed's last slides.

**Solve.** With :math:`h = D^{1/2} g` and :math:`S = \tilde T D^{1/2}` (``M × q``),
:math:`w = D^{1/2}(S^\top S + \varepsilon I)^{-1} h`. The *primal* form (``q ≤ M``)
eigen-decomposes :math:`S^\top S` (``q × q``). The *dual* form (``q > M``) takes ``Q``
``(q, M)`` with orthonormal columns spanning the range of :math:`S^\top` and uses

.. math:: (S^\top S + \varepsilon I)^{-1} h = \varepsilon^{-1}(h - QQ^\top h)
          + Q (Q^\top S^\top S Q + \varepsilon I)^{-1} Q^\top h ,

which equals the Woodbury form of DESIGN §2 in exact arithmetic but never subtracts two
nearly equal vectors and divides by :math:`\varepsilon`: ``Q`` is orthonormal to rounding,
so the error stays bounded as :math:`\varepsilon \to 0`. ``Q`` comes from two passes of
``M × M`` Gram eigen-decompositions (matrix products only; ``form="dual-qr"`` uses a
Householder QR instead). ``docs/accuracy.md`` measures every form against the Woodbury
formula as written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _backend
from .kernels import Kernel, coordinate_onehot
from .nystrom import NystromBasis

__all__ = [
    "WhitenedSolver",
    "cc_gram",
    "cotangents",
    "damping_from_whitened",
    "factorize_whitened",
    "k_gram",
    "kwng_direction",
    "metric_apply",
    "solve_whitened",
    "t_matrix",
    "whiten",
]

#: Bytes that one chunk's temporaries may take when ``chunk_size`` is not given.
CHUNK_BYTES = 64 * 2**20


# -- the shared context: validated samples, basis points and resolved kernel ----------------


@dataclass(frozen=True)
class _Context:
    xp: Any
    samples: Any  # (N, d)
    points: Any  # (M, d), Y_m = samples[indices[m]]
    onehot: Any  # (M, d), onehot[m, i_m] = 1
    kernel: Kernel  # bandwidth resolved on (points, samples)

    @property
    def shape(self):
        n, d = self.samples.shape
        return n, d, self.points.shape[0]

    def rows(self, x):
        """``∂_{x_{i_m}} ∂_y k(Y_m, x_n)`` for samples ``x`` ``(c, d)``: ``(M, c, d)``."""
        return self.kernel._rows(self.xp, self.points, self.onehot, x, self.kernel.bandwidth)


def _context(samples, basis, kernel, others=(), names=()) -> tuple[_Context, tuple]:
    """Validate ``samples``, ``basis``, ``kernel`` and any ``others`` (cast to one dtype)."""
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel must be a wngkernels Kernel; got {type(kernel).__name__}")
    if not isinstance(basis, NystromBasis):
        raise TypeError(f"basis must be a NystromBasis; got {type(basis).__name__}")
    arrays = (samples, *others)
    all_names = ("samples", *names)
    xp = _backend.namespace(*arrays, names=all_names)
    _backend.common_device(xp, *arrays, names=all_names)
    dtype = _backend.result_float_dtype(xp, *(a for a in arrays if a is not None))
    samples = _backend.as_float_matrix(xp, samples, "samples", dtype)
    n, d = samples.shape
    basis.check(n, d)
    dev = _backend.device(samples)
    idx = xp.asarray(basis.indices.copy(), device=dev)  # writable for torch
    points = xp.take(samples, idx, axis=0)
    onehot = coordinate_onehot(xp, basis.dims, basis.num_basis, d, samples)
    kernel = kernel.resolve(points, samples)
    cast = []
    for a, name in zip(others, names, strict=False):
        if a is not None:
            a = a if a.dtype == dtype else xp.astype(a, dtype)
            _backend.require_finite(xp, a, name)
        cast.append(a)
    return _Context(xp, samples, points, onehot, kernel), tuple(cast)


def _chunk(n: int, m: int, d: int, itemsize: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
        return min(chunk_size, n)
    # about four (M, c, d) temporaries live at once in a chunk
    return max(1, min(n, CHUNK_BYTES // (4 * m * d * itemsize)))


def _itemsize(xp, dtype) -> int:
    return 8 if dtype == xp.float64 else 4 if dtype == xp.float32 else 2


def _check_jacobian(jacobian, n: int, d: int) -> int:
    if jacobian.ndim != 3 or jacobian.shape[0] != n or jacobian.shape[1] != d:
        raise ValueError(
            f"jacobian must have shape (N, d, q) = ({n}, {d}, q) to match samples; "
            f"got {tuple(jacobian.shape)}"
        )
    return jacobian.shape[2]


def _cc_chunk(ctx: _Context, x, center):
    r"""``Σ_n H_n H_nᵀ`` over the samples ``x`` ``(c, d)`` of a chunk, in ``O(M² c)``: no ``d`` factor.

    Each row is ``H_n[m, :] = α_{mn} u_{mn} + β_{mn} e_{i_m}`` with ``u_{mn} = Y_m − X_n``
    (:meth:`Kernel._row_coefficients`), so with ``A = α``, ``B = β`` ``(M, c)``,
    ``P = Y Xᵀ`` and ``x_sel[m, n] = X_n[i_m]``:

    .. math::

        \sum_n H_nH_n^\top = YY^\top \odot AA^\top + F + F^\top + EE^\top \odot BB^\top,
        \quad F = \big(A \odot (\tfrac12\lVert X\rVert^2 - P)\big)A^\top
             + YE^\top \odot AB^\top - A\,(B \odot x_{sel})^\top ,

    using :math:`u_{mn}\cdot u_{m'n} = Y_m\cdot Y_{m'} - P_{mn} - P_{m'n} + \lVert X_n\rVert^2`.
    Points are centred on ``center`` first (the kernel is translation invariant), which keeps
    that expansion free of cancellation.
    """
    xp, kernel, e = ctx.xp, ctx.kernel, ctx.onehot
    y, x = ctx.points - center, x - center
    p = y @ x.T
    xx = xp.sum(x * x, axis=1)
    sq = xp.maximum(xp.sum(y * y, axis=1)[:, None] + xx[None, :] - 2 * p, 0.0)
    x_sel = e @ x.T
    a, b = kernel._row_coefficients(xp, sq, xp.sum(y * e, axis=1)[:, None] - x_sel, kernel.bandwidth)
    f = (a * (xx[None, :] / 2 - p)) @ a.T + (y @ e.T) * (a @ b.T) - a @ (b * x_sel).T
    return (y @ y.T) * (a @ a.T) + f + f.T + (e @ e.T) * (b @ b.T)


def _accumulate(ctx: _Context, jacobian=None, chunk_size=None):
    """One pass over chunks of samples: ``C Cᵀ`` ``(M, M)`` and, given a Jacobian, ``T`` ``(M, q)``.

    ``C Cᵀ`` costs ``O(M² N)`` and memory ``O(M² + chunk · M)`` (:func:`_cc_chunk`); ``T``
    from a Jacobian needs the ``(M, chunk, d)`` rows. ``C`` is never formed.
    """
    xp = ctx.xp
    n, d, m = ctx.shape
    step = _chunk(n, m, 1 if jacobian is None else d, _itemsize(xp, ctx.samples.dtype), chunk_size)
    dev = _backend.device(ctx.samples)
    center = xp.mean(ctx.samples, axis=0)
    cc = xp.zeros((m, m), dtype=ctx.samples.dtype, device=dev)
    t = None if jacobian is None else xp.zeros((m, jacobian.shape[2]), dtype=cc.dtype, device=dev)
    for start in range(0, n, step):
        stop = min(start + step, n)
        chunk = ctx.samples[start:stop, :]
        cc = cc + _cc_chunk(ctx, chunk, center)
        if jacobian is not None:
            rows = xp.reshape(ctx.rows(chunk), (m, (stop - start) * d))
            t = t + rows @ xp.reshape(jacobian[start:stop, ...], ((stop - start) * d, -1))
    cc = cc / n
    return (cc + cc.T) / 2, (None if t is None else t / n)


# -- public building blocks ---------------------------------------------------------------------


def cotangents(samples, *, kernel: Kernel, basis: NystromBasis):
    r"""The ``M`` cotangents whose vector–Jacobian products give the rows of ``T``.

    Parameters
    ----------
    samples : array, shape (N, d)
    kernel : Kernel
        Its bandwidth rule, if any, is evaluated on (basis points, samples).
    basis : NystromBasis

    Returns
    -------
    array, shape (M, N, d)
        ``A[m, n, i] = N⁻¹ ∂_{x_{i_m}} ∂_{y_i} k(Y_m, X_n)``, so that
        ``T[m, :] = Σ_{n,i} A[m, n, i] ∇_θ h_θ(Z_n)_i`` (one VJP per ``m``).
    """
    ctx, _ = _context(samples, basis, kernel)
    return ctx.rows(ctx.samples) / ctx.shape[0]


def cc_gram(samples, *, kernel: Kernel, basis: NystromBasis, chunk_size: int | None = None):
    r""":math:`CC^\top = N^{-1}\sum_n H_n H_n^\top`, ``H_n[m, i] = ∂_{x_{i_m}}∂_{y_i}k(Y_m, X_n)``.

    Accumulated over chunks of samples: memory ``O(M² + chunk · M · d)``, never the
    ``M × Nd`` matrix ``C``.

    Parameters
    ----------
    samples : array, shape (N, d)
    kernel : Kernel
    basis : NystromBasis
    chunk_size : int, optional
        Samples per chunk; default: as many as keep a chunk's temporaries near
        :data:`~wngkernels.estimator.CHUNK_BYTES`.

    Returns
    -------
    array, shape (M, M)
        Symmetric positive semi-definite.
    """
    ctx, _ = _context(samples, basis, kernel)
    return _accumulate(ctx, chunk_size=chunk_size)[0]


def k_gram(samples, *, kernel: Kernel, basis: NystromBasis):
    r""":math:`K_{m,m'} = \partial_{x_{i_m}}\partial_{y_{i_{m'}}} k(Y_m, Y_{m'})`, shape ``(M, M)``.

    The Gram matrix of the basis functions in the RKHS (the ``λ`` term of DESIGN §2).
    """
    ctx, _ = _context(samples, basis, kernel)
    return _k(ctx)


def _k(ctx: _Context):
    y, e = ctx.points, ctx.onehot
    k = ctx.kernel._selected(ctx.xp, y, e, y, e, ctx.kernel.bandwidth)
    return (k + k.T) / 2


def t_matrix(samples, *, kernel: Kernel, basis: NystromBasis, jacobian=None, vjp=None,
             chunk_size: int | None = None):
    r""":math:`T` ``(M, q)``, from a Jacobian or from a vector–Jacobian product.

    Parameters
    ----------
    samples : array, shape (N, d)
    kernel : Kernel
    basis : NystromBasis
    jacobian : array, shape (N, d, q), optional
        ``jacobian[n, i, :] = ∇_θ h_θ(Z_n)_i``; contracted chunk by chunk.
    vjp : callable, optional
        Maps cotangents ``(M, N, d)`` (see :func:`cotangents`) to ``(M, q)``: row ``m``
        is ``Σ_{n,i} A[m, n, i] ∇_θ h_θ(Z_n)_i``. Exactly one of ``jacobian``, ``vjp``.
    chunk_size : int, optional

    Returns
    -------
    array, shape (M, q)
    """
    _one_of(jacobian, vjp)
    ctx, (jacobian,) = _context(samples, basis, kernel, (jacobian,), ("jacobian",))
    if jacobian is not None:
        _check_jacobian(jacobian, *ctx.samples.shape)
        return _accumulate(ctx, jacobian, chunk_size)[1]
    return _call_vjp(ctx, vjp, None)


def _one_of(jacobian, vjp):
    if (jacobian is None) == (vjp is None):
        raise ValueError("pass exactly one of jacobian (N, d, q) and vjp (a callable)")
    if vjp is not None and not callable(vjp):
        raise TypeError(f"vjp must be callable; got {type(vjp).__name__}")


def _call_vjp(ctx: _Context, vjp: Callable, q: int | None):
    xp = ctx.xp
    n, d, m = ctx.shape
    t = vjp(ctx.rows(ctx.samples) / n)
    try:
        same = _backend.namespace(t) is xp
    except TypeError:
        same = False
    if not same:
        raise TypeError(f"vjp must return an array of the samples' library; got {type(t).__name__}")
    if t.ndim != 2 or t.shape[0] != m or (q is not None and t.shape[1] != q):
        want = f"(M, q) = ({m}, {'q' if q is None else q})"
        raise ValueError(f"vjp must return shape {want}; got {tuple(t.shape)}")
    if t.dtype != ctx.samples.dtype:
        t = xp.astype(t, ctx.samples.dtype)
    _backend.require_finite(xp, t, "vjp output")
    return t


def _eps_floor(xp, dtype) -> float:
    return float(xp.finfo(dtype).eps)


def whiten(cc, t, *, k=None, lam: float = 0.0, rcond: float | None = None):
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
    inv_sqrt = xp.where(keep, 1.0 / xp.sqrt(xp.where(keep, sigma, 1.0)), 0.0)
    return inv_sqrt[:, None] * (v.T @ t)


def damping_from_whitened(t_white, *, floor: float | None = None):
    r"""The Jacobian-norm damping :math:`D_{jj} = 1/(\lVert \tilde T_{:,j}\rVert + \delta)`.

    That is :math:`D = \mathrm{diag}(\hat G)^{-1/2}` (what the authors' code uses), guarded
    by :math:`\delta = ` ``floor · max_j ‖T̃[:, j]‖`` so a parameter the outputs ignore gets a
    finite weight.

    Parameters
    ----------
    t_white : array, shape (M, q)
        :func:`whiten`'s output.
    floor : float, optional
        Relative guard; default ``sqrt(eps)`` of the dtype.

    Returns
    -------
    array, shape (q,)
        Positive; all ones when ``T̃ = 0``.
    """
    xp = _backend.namespace(t_white, names=("t_white",))
    floor = math.sqrt(_eps_floor(xp, t_white.dtype)) if floor is None else _check_nonneg(floor, "floor")
    norms = xp.sqrt(xp.sum(t_white * t_white, axis=0))
    top = xp.max(norms)
    delta = xp.where(top > 0, floor * top, 1.0)
    return xp.where(top > 0, 1.0 / (norms + delta), xp.ones_like(norms))


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


@dataclass(frozen=True)
class WhitenedSolver:
    r"""``g ↦ (T̃ᵀT̃ + ε D⁻¹)⁻¹ g`` for any ``ε``, factorised once (:func:`factorize_whitened`).

    With ``S = T̃ D^{1/2}`` and ``h = D^{1/2} g``, it stores ``V`` with orthonormal columns and
    ``μ`` such that ``SᵀS = V diag(μ) Vᵀ``, and in the dual form the orthonormal ``Q`` spanning
    the range of ``Sᵀ``: then ``(SᵀS + εI)⁻¹h = V diag(1/(μ + ε)) Vᵀh [+ ε⁻¹(h − QQᵀh)]``.
    A solve costs a few products with ``V`` (and ``Q``) — what a training loop needs between
    refreshes of ``T̃``, for any ``ε``.

    Attributes
    ----------
    vectors : array, shape (q, k)
        ``V`` (``k = q`` in the primal form, ``k = M`` in the dual form).
    values : array, shape (k,)
        ``μ >= 0``.
    root : array, shape (q,) or None
        ``D^{1/2}``; ``None`` for ``D = I``.
    span : array, shape (q, M) or None
        ``Q`` in the dual form; ``None`` in the primal form, where ``V`` spans ``R^q``.
    """

    vectors: Any
    values: Any
    root: Any
    span: Any

    def solve(self, grad, eps: float):
        """The direction ``w`` ``(q,)`` for the gradient ``grad`` ``(q,)`` and damping ``eps > 0``."""
        _backend.namespace(grad, self.vectors, names=("grad", "vectors"))
        eps = _check_positive(eps, "eps")
        q = self.vectors.shape[0]
        if grad.ndim != 1 or grad.shape[0] != q:
            raise ValueError(f"grad must have shape (q,) = ({q},); got {tuple(grad.shape)}")
        h = grad if self.root is None else self.root * grad
        x = self.vectors @ ((self.vectors.T @ h) / (self.values + eps))
        if self.span is not None:
            x = x + (h - self.span @ (self.span.T @ h)) / eps
        return x if self.root is None else self.root * x


def factorize_whitened(t_white, *, damping=None, form: str = "auto") -> WhitenedSolver:
    r"""Factorise ``T̃ᵀT̃ + ε D⁻¹`` once for every ``ε``: a :class:`WhitenedSolver`.

    Parameters
    ----------
    t_white : array, shape (M, q)
        :math:`\tilde T` (:func:`whiten`).
    damping : array, shape (q,), optional
        The positive diagonal of ``D``; ``None`` for ``D = I``.
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
    if form not in ("auto", "primal", "dual", "dual-qr"):
        raise ValueError(f"form must be 'auto', 'primal', 'dual' or 'dual-qr'; got {form!r}")
    root = None if damping is None else xp.sqrt(damping)
    s = t_white if root is None else t_white * root[None, :]
    if form == "primal" or (form == "auto" and q <= m):
        mu, vectors = xp.linalg.eigh(s.T @ s)
        span = None
    else:
        basis = xp.linalg.qr(s.T)[0] if form == "dual-qr" else _orthonormal_range(xp, s.T)  # (q, M)
        b = s @ basis  # (M, M): SQ, so QᵀSᵀSQ = bᵀb
        mu, u = xp.linalg.eigh(b.T @ b)
        vectors, span = basis @ u, basis
    return WhitenedSolver(vectors, xp.where(mu > 0, mu, 0.0), root, span)


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
        The positive diagonal of ``D``; ``None`` for ``D = I``.
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
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number; got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return v


def _damping(xp, damping, t_white, q: int, dtype):
    if isinstance(damping, str):
        if damping == "identity":
            return None
        if damping == "jacobian":
            return damping_from_whitened(t_white)
        raise ValueError(f"damping must be 'identity', 'jacobian' or a positive array (q,); got {damping!r}")
    try:
        same = _backend.namespace(damping) is xp
    except TypeError:
        same = False
    if not same:
        raise TypeError(f"damping array must come from the samples' library; got {type(damping).__name__}")
    if damping.ndim != 1 or damping.shape[0] != q:
        raise ValueError(f"damping must have shape (q,) = ({q},); got {tuple(damping.shape)}")
    damping = xp.astype(damping, dtype) if damping.dtype != dtype else damping
    if not bool(xp.all(xp.isfinite(damping) & (damping > 0))):
        raise ValueError("damping must be finite and > 0 everywhere")
    return damping


def kwng_direction(grad, samples, *, kernel: Kernel, basis: NystromBasis, eps: float,
                   lam: float = 0.0, damping="identity", jacobian=None, vjp=None,
                   rcond: float | None = None, chunk_size: int | None = None, form: str = "auto"):
    r"""The kernelized Wasserstein natural gradient :math:`w = (\hat G + \varepsilon D^{-1})^{-1} g`.

    Parameters
    ----------
    grad : array, shape (q,)
        Euclidean gradient ``g``.
    samples : array, shape (N, d)
        ``X_n = h_θ(Z_n)``.
    kernel : Kernel
        E.g. ``Gaussian(AuthorsRule())``; a bandwidth rule is evaluated once, on
        (basis points, samples).
    basis : NystromBasis
        ``M`` pairs (:func:`~wngkernels.nystrom_basis`).
    eps : float
        Damping :math:`\varepsilon > 0`.
    lam : float
        RKHS regularisation :math:`\lambda \ge 0`; ``0`` gives the ridgeless form.
    damping : {"identity", "jacobian"} or array of shape (q,)
        ``D``: identity; ``diag(Ĝ)^{-1/2}`` (:func:`damping_from_whitened`); or its
        positive diagonal.
    jacobian : array, shape (N, d, q), optional
        ``jacobian[n, i, :] = ∇_θ h_θ(Z_n)_i``.
    vjp : callable, optional
        Cotangents ``(M, N, d)`` → ``(M, q)`` (see :func:`t_matrix`). Exactly one of
        ``jacobian`` and ``vjp``.
    rcond : float, optional
        Spectral cut-off of :func:`whiten`.
    chunk_size : int, optional
        Samples per chunk of :func:`cc_gram`.
    form : {"auto", "primal", "dual"}
        See :func:`solve_whitened`.

    Returns
    -------
    array, shape (q,)
        In the namespace, dtype and device of the inputs.

    Examples
    --------
    The seed's Gaussian model ``X = a + rZ`` has ``G_W = diag(I_d, d)``:

    >>> import numpy as np
    >>> from wngkernels import Gaussian, AuthorsRule, nystrom_basis, kwng_direction
    >>> from wngkernels.models import GaussianModel
    >>> model = GaussianModel(d=2)
    >>> theta, z = model.default_theta(), model.sample_latent(2000, rng=0)
    >>> g = np.array([1.0, -1.0, 2.0])
    >>> w = kwng_direction(g, model.h(theta, z), kernel=Gaussian(AuthorsRule()),
    ...                    basis=nystrom_basis((2000, 2), 90, rng=1), eps=1e-5,
    ...                    jacobian=model.jacobian(theta, z))
    >>> exact = model.natural_gradient(theta, g)
    >>> bool(np.linalg.norm(w - exact) / np.linalg.norm(exact) < 0.1)
    True
    """
    _one_of(jacobian, vjp)
    ctx, (grad, jacobian) = _context(
        samples, basis, kernel, (grad, jacobian), ("grad", "jacobian")
    )
    xp = ctx.xp
    n, d, _ = ctx.shape
    if grad.ndim != 1:
        raise ValueError(f"grad must be 1-D (q,); got shape {tuple(grad.shape)}")
    q = grad.shape[0]
    eps = _check_positive(eps, "eps")
    lam = _check_nonneg(lam, "lam")
    if jacobian is not None:
        if _check_jacobian(jacobian, n, d) != q:
            raise ValueError(f"jacobian's last axis must match grad: q = {q}; got {jacobian.shape[2]}")
        cc, t = _accumulate(ctx, jacobian, chunk_size)
    else:
        cc, _ = _accumulate(ctx, chunk_size=chunk_size)
        t = _call_vjp(ctx, vjp, q)
    t_white = whiten(cc, t, k=_k(ctx) if lam > 0 else None, lam=lam, rcond=rcond)
    dmp = _damping(xp, damping, t_white, q, grad.dtype)
    return solve_whitened(t_white, grad, eps=eps, damping=dmp, form=form)


def metric_apply(v, samples, *, kernel: Kernel, basis: NystromBasis, lam: float = 0.0,
                 jacobian=None, vjp=None, rcond: float | None = None, chunk_size: int | None = None):
    r"""The estimated metric applied to a vector: :math:`\hat G v = T^\top (CC^\top + \lambda K)^\dagger T v`.

    Parameters
    ----------
    v : array, shape (q,)
    samples, kernel, basis, lam, jacobian, vjp, rcond, chunk_size
        As in :func:`kwng_direction`.

    Returns
    -------
    array, shape (q,)
    """
    _one_of(jacobian, vjp)
    ctx, (v, jacobian) = _context(samples, basis, kernel, (v, jacobian), ("v", "jacobian"))
    if v.ndim != 1:
        raise ValueError(f"v must be 1-D (q,); got shape {tuple(v.shape)}")
    lam = _check_nonneg(lam, "lam")
    if jacobian is not None:
        if _check_jacobian(jacobian, *ctx.samples.shape) != v.shape[0]:
            raise ValueError(f"jacobian's last axis must match v: q = {v.shape[0]}")
        cc, t = _accumulate(ctx, jacobian, chunk_size)
    else:
        cc, _ = _accumulate(ctx, chunk_size=chunk_size)
        t = _call_vjp(ctx, vjp, v.shape[0])
    t_white = whiten(cc, t, k=_k(ctx) if lam > 0 else None, lam=lam, rcond=rcond)
    return t_white.T @ (t_white @ v)

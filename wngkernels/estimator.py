r"""The KWNG estimator: cotangents, :math:`CC^\top`, :math:`K`, :math:`T`, the solve.

The mathematics page ("The kernelized estimator") derives every formula below.

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

which equals the Woodbury form of the mathematics page in exact arithmetic but never subtracts two
nearly equal vectors and divides by :math:`\varepsilon`: ``Q`` is orthonormal to rounding,
so the error stays bounded as :math:`\varepsilon \to 0`. ``Q`` comes from two passes of
``M × M`` Gram eigen-decompositions (matrix products only; ``form="dual-qr"`` uses a
Householder QR instead). ``docs/accuracy.md`` measures every form against the Woodbury
formula as written.

**Units of the bandwidth.** Samples are centred and divided by the bandwidth :math:`\ell`
before anything else: the kernel rows are computed as :math:`\hat H = \ell^2 H`, so that
:math:`\hat C\hat C^\top = \ell^4 CC^\top` and :math:`\hat K = \ell^2 K` are of order one
whatever the scale of the samples, and :math:`\hat T = \ell^2 T` is of the order of the
Jacobian. The whitened :math:`\tilde T` is the same in these units (with :math:`\lambda\ell^2`
in place of :math:`\lambda`), so :func:`~wngkernels.kwng_direction` never forms a power of
:math:`\ell`; the building blocks (:func:`~wngkernels.cc_gram`, :func:`~wngkernels.k_gram`,
:func:`~wngkernels.t_matrix`, :func:`~wngkernels.cotangents`) apply theirs at the end and refuse,
with a ``ValueError`` naming ``bandwidth``, a result beyond the dtype's range. Samples scaled by
``s`` (with a bandwidth rule, or the bandwidth scaled by ``s``), the Jacobian by ``s`` and ``eps``
by ``s²`` give ``w / s²`` to the dtype's precision.

**Half precision.** ``float16`` and ``bfloat16`` inputs are computed in ``float32`` and the
results cast back; a result beyond the half-precision range is refused with a ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _backend
from .kernels import Kernel, coordinate_onehot
from .nystrom import NystromBasis
from .solve import (
    DAMPING_FLOOR,
    _cast_back,
    _damping_from_whitened,
    _solve_whitened,
    _whiten,
)

__all__ = ["cc_gram", "cotangents", "k_gram", "kwng_direction", "metric_apply", "t_matrix"]

#: Bytes that one chunk's temporaries may take when ``chunk_size`` is not given.
CHUNK_BYTES = 64 * 2**20

#: Largest distance of a sample from the mean, in bandwidths, up to which ``C Cᵀ`` is accumulated
#: by the ``O(M² N)`` expansion (:func:`_cc_chunk`, which loses about ``eps · R²`` relative);
#: beyond it, from the kernel rows (``O(M² N d)``, rounding-level).
EXPANSION_RADIUS = 16.0


# -- the shared context: validated samples, basis points and resolved kernel ----------------


@dataclass(frozen=True)
class _Context:
    xp: Any
    samples: Any  # (N, d), centred and in units of the bandwidth: (X − X̄)/ℓ
    points: Any  # (M, d), Y_m = samples[indices[m]], in the same units
    onehot: Any  # (M, d), onehot[m, i_m] = 1
    kernel: Kernel  # bandwidth resolved on (points, samples)
    out: Any  # the dtype of the results (the samples' floating dtype)
    direct: bool  # C Cᵀ from the rows (points far apart in bandwidth units) instead of the expansion

    @property
    def shape(self):
        n, d = self.samples.shape
        return n, d, self.points.shape[0]

    @property
    def ell(self) -> float:
        return self.kernel.bandwidth

    def rows(self, x):
        """``ℓ² ∂_{x_{i_m}} ∂_y k(Y_m, x_n)`` ``(M, c, d)`` for samples ``x`` ``(c, d)`` (bandwidth units)."""
        return self.kernel._rows(self.xp, self.points, self.onehot, x)

    def in_units(self, a, power: int, name: str):
        """``a · ℓ^{-power}`` in the output dtype: ``a`` holds a result in units of the bandwidth."""
        return _unscale(self.xp, a, self.ell, power, self.out, name)


def _unscale(xp, a, ell: float, power: int, out, name: str):
    """``a · ℓ^{-power}`` cast to ``out``; ``ValueError`` if its largest entry leaves ``out``'s range."""
    top = _backend.max_abs(xp, a)
    if top == 0:
        return xp.astype(a, out)
    if not math.isfinite(top):
        raise ValueError(f"{name} overflows {a.dtype}: the jacobian (or the vjp's output) is too large")
    log_top = math.log(top) - power * math.log(ell)
    info = xp.finfo(out)
    if not math.log(float(info.smallest_normal)) <= log_top <= math.log(float(info.max)):
        raise ValueError(
            f"{name} is beyond the range of {out} with bandwidth={ell!r}: its entries reach "
            f"1e{log_top / math.log(10):+.0f}; rescale the samples (and the bandwidth) or use a wider dtype"
        )
    return xp.astype((a / top) * math.exp(log_top), out)


def _context(samples, basis, kernel, others=(), names=()) -> tuple[_Context, tuple]:
    """Validate ``samples``, ``basis``, ``kernel`` and any ``others`` (cast to one dtype).

    The samples come back centred and in units of the resolved bandwidth (:class:`_Context`),
    everything in the work dtype (``float32`` for half-precision input).
    """
    _check_kernel_basis(kernel, basis)
    arrays = (samples, *others)
    all_names = ("samples", *names)
    xp = _backend.namespace(*arrays, names=all_names)
    _backend.common_device(xp, *arrays, names=all_names)
    out = _backend.result_float_dtype(xp, *(a for a in arrays if a is not None))
    work = _backend.work_dtype(xp, out)
    samples = _backend.as_float_matrix(xp, samples, "samples", work)
    n, d = samples.shape
    basis.check(n, d)
    dev = _backend.device(samples)
    idx = xp.asarray(basis.indices.copy(), device=dev)  # writable for torch
    onehot = coordinate_onehot(xp, basis.dims, basis.num_basis, d, samples)
    kernel = kernel.resolve(xp.take(samples, idx, axis=0), samples)
    x_hat = _in_bandwidth_units(xp, samples, kernel.bandwidth)
    # the O(M² N) expansion of C Cᵀ loses about eps · R² relative, R = max ‖x̂_n‖: beyond
    # EXPANSION_RADIUS² the rows are used instead (O(M² N d))
    with _backend.ignore_overflow():  # inf: far beyond the radius
        direct = float(xp.max(xp.sum(x_hat * x_hat, axis=1))) > EXPANSION_RADIUS**2
    cast = []
    for a, name in zip(others, names, strict=False):
        if a is not None:
            a = a if a.dtype == work else xp.astype(a, work)
            _backend.require_finite(xp, a, name)
        cast.append(a)
    ctx = _Context(xp, x_hat, xp.take(x_hat, idx, axis=0), onehot, kernel, out, direct)
    return ctx, tuple(cast)


def _check_kernel_basis(kernel, basis) -> None:
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel must be a wngkernels Kernel; got {type(kernel).__name__}")
    if not isinstance(basis, NystromBasis):
        raise TypeError(f"basis must be a NystromBasis; got {type(basis).__name__}")


def _in_bandwidth_units(xp, x, ell: float):
    """``(x − x̄)/ℓ``, through powers of two near the data's magnitude, so that neither the mean
    nor the quotient over- or underflows before the result would."""
    big = _backend.max_abs(xp, x)
    if big == 0:
        return x
    c0 = _backend.pow2_below(big)
    dev = x - xp.mean(x / c0, axis=0) * c0
    c, spread = _unit_factors(xp, _backend.max_abs(xp, dev), ell, x.dtype)
    return dev if c == 1 and spread == 1 else (dev / c) * spread  # (1, 1): nothing to scale


def _unit_factors(xp, top: float, ell: float, dtype) -> tuple[float, float]:
    """``(c, s)`` with ``(x − x̄)/ℓ = ((x − x̄)/c) · s``: ``c`` a power of two near ``top`` (the
    largest ``|x − x̄|``), ``s = c/ℓ``; ``(1, 1)`` when ``top`` is 0 (all samples equal, possible
    with a fixed bandwidth). ``ValueError`` if ``top`` or the spread in bandwidths leaves the
    dtype's range. Shared with callers that reduce ``top`` and ``x̄`` themselves (chunked arrays)."""
    if top == 0:
        return 1.0, 1.0
    if not math.isfinite(top):
        raise ValueError(f"samples are too large for {dtype}: their deviations from the mean overflow")
    c = _backend.pow2_below(top)
    spread = c / ell
    limit = float(xp.finfo(dtype).max) / 4
    if not spread < limit:
        raise ValueError(
            f"samples span about {c:.3g} = {spread:.3g} bandwidths (bandwidth={ell!r}), beyond the "
            f"range of {dtype}; use a larger bandwidth or a wider dtype"
        )
    return c, spread


def _chunk(n: int, m: int, d: int, itemsize: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return min(_backend.check_int(chunk_size, "chunk_size", minimum=1), n)
    # about four (M, c, d) temporaries live at once in a chunk
    return max(1, min(n, CHUNK_BYTES // (4 * m * d * itemsize)))


def _itemsize(xp, dtype) -> int:
    return xp.finfo(dtype).bits // 8


def _check_jacobian(jacobian, n: int, d: int) -> int:
    _backend.check_shape(jacobian, "jacobian", (n, d, None), "(N, d, q)")
    return jacobian.shape[2]


def _cc_chunk(ctx: _Context, x):
    r"""``Σ_n H_n H_nᵀ`` over the samples ``x`` ``(c, d)`` of a chunk, in ``O(M² c)``: no ``d`` factor.

    Each row is ``H_n[m, :] = α_{mn} u_{mn} + β_{mn} e_{i_m}`` with ``u_{mn} = Y_m − X_n``
    (:meth:`Kernel._row_coefficients`), so with ``A = α``, ``B = β`` ``(M, c)``,
    ``P = Y Xᵀ`` and ``x_sel[m, n] = X_n[i_m]``:

    .. math::

        \sum_n H_nH_n^\top = YY^\top \odot AA^\top + F + F^\top + EE^\top \odot BB^\top,
        \quad F = \big(A \odot (\tfrac12\lVert X\rVert^2 - P)\big)A^\top
             + YE^\top \odot AB^\top - A\,(B \odot x_{sel})^\top ,

    using :math:`u_{mn}\cdot u_{m'n} = Y_m\cdot Y_{m'} - P_{mn} - P_{m'n} + \lVert X_n\rVert^2`.
    Points are centred and in units of the bandwidth (:class:`_Context`); the expansion then
    loses about ``eps · max‖x̂‖²`` relative to the result, which :func:`_context` bounds (beyond
    the bound :func:`_accumulate` takes the rows instead: ``ctx.direct``).
    """
    xp, kernel, e = ctx.xp, ctx.kernel, ctx.onehot
    y = ctx.points
    p = y @ x.T
    xx = xp.sum(x * x, axis=1)
    sq = xp.sum(y * y, axis=1)[:, None] + xx[None, :] - 2 * p
    sq = xp.where(sq < 0, 0.0, sq)  # not maximum(sq, 0.0): array-api-compat copies its scalar from the host
    x_sel = e @ x.T
    a, b = kernel._row_coefficients(xp, sq, xp.sum(y * e, axis=1)[:, None] - x_sel)
    f = (a * (xx[None, :] / 2 - p)) @ a.T + (y @ e.T) * (a @ b.T) - a @ (b * x_sel).T
    return (y @ y.T) * (a @ a.T) + f + f.T + (e @ e.T) * (b @ b.T)


def _gram_of_rows(xp, rows):
    """``Σ_n H_n H_nᵀ`` ``(M, M)`` from a block's rows ``H`` ``(M, c, d)``
    (:meth:`Kernel.cross_hessian_rows`): ``C Cᵀ`` of the block, times ``c``, in ``O(M² c d)``.
    The torch edge, which has the rows for ``T``'s cotangents, takes ``C Cᵀ`` from here too."""
    flat = xp.reshape(rows, (rows.shape[0], -1))
    return flat @ flat.T


def _accumulate(ctx: _Context, jacobian=None, chunk_size=None):
    """One pass over chunks of samples: ``Ĉ Ĉᵀ`` ``(M, M)`` and, given a Jacobian, ``T̂`` ``(M, q)``
    (in units of the bandwidth: ``ℓ⁴ C Cᵀ`` and ``ℓ² T``): :func:`_sums` over ``N``."""
    cc, t = _sums(ctx, jacobian, chunk_size)
    return _means(cc, t, ctx.shape[0])


def _means(cc, t, n: int):
    """The sums of :func:`_sums` over ``n`` samples divided by ``n`` (``C Cᵀ`` symmetrised)."""
    cc = cc / n
    return (cc + cc.T) / 2, (None if t is None else t / n)


def _sums(ctx: _Context, jacobian=None, chunk_size=None):
    """``Σ_n Ĥ_n Ĥ_nᵀ`` ``(M, M)`` and, given a Jacobian ``(n, d, q)``, ``Σ_{n,i} Ĥ_n[:, i] J[n, i, :]``
    ``(M, q)`` (else ``None``) over the samples of ``ctx``: not divided by ``n`` (sums over
    blocks of samples add up, :func:`_means` normalises).

    ``C Cᵀ`` costs ``O(M² N)`` and memory ``O(M² + chunk · M)`` (:func:`_cc_chunk`), or, where
    the points are far apart in units of the bandwidth (``ctx.direct``), ``O(M² N d)`` from the
    ``(M, chunk, d)`` rows; ``T`` from a Jacobian needs those rows. ``C`` is never formed.
    """
    xp = ctx.xp
    n, d, m = ctx.shape
    rows_needed = jacobian is not None or ctx.direct
    step = _chunk(n, m, d if rows_needed else 1, _itemsize(xp, ctx.samples.dtype), chunk_size)
    dev = _backend.device(ctx.samples)
    cc = xp.zeros((m, m), dtype=ctx.samples.dtype, device=dev)
    t = None if jacobian is None else xp.zeros((m, jacobian.shape[2]), dtype=cc.dtype, device=dev)
    for start in range(0, n, step):
        stop = min(start + step, n)
        chunk = ctx.samples[start:stop, :]
        rows = xp.reshape(ctx.rows(chunk), (m, (stop - start) * d)) if rows_needed else None
        cc = cc + (_gram_of_rows(xp, rows) if ctx.direct else _cc_chunk(ctx, chunk))
        if jacobian is not None:
            t = t + rows @ xp.reshape(jacobian[start:stop, ...], ((stop - start) * d, -1))
    return cc, t


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
    return ctx.in_units(ctx.rows(ctx.samples) / ctx.shape[0], 2, "cotangents")


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
    return ctx.in_units(_accumulate(ctx, chunk_size=chunk_size)[0], 4, "cc_gram")


def k_gram(samples, *, kernel: Kernel, basis: NystromBasis):
    r""":math:`K_{m,m'} = \partial_{x_{i_m}}\partial_{y_{i_{m'}}} k(Y_m, Y_{m'})`, shape ``(M, M)``.

    The Gram matrix of the basis functions in the RKHS (the ``λ`` term of the estimator).
    """
    ctx, _ = _context(samples, basis, kernel)
    return ctx.in_units(_k(ctx), 2, "k_gram")


def _k(ctx: _Context):
    """``K̂ = ℓ² K`` (bandwidth units)."""
    return ctx.kernel._basis_gram(ctx.xp, ctx.points, ctx.onehot)


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
        is ``Σ_{n,i} A[m, n, i] ∇_θ h_θ(Z_n)_i``. Exactly one of ``jacobian``, ``vjp``. It must be
        linear in the cotangents (a vector–Jacobian product is): it is called with them in units
        of the bandwidth, ``ℓ² A`` (in range at any scale of the samples), and its output is divided
        by ``ℓ²``.
    chunk_size : int, optional

    Returns
    -------
    array, shape (M, q)
    """
    _one_of(jacobian, vjp)
    ctx, (jacobian,) = _context(samples, basis, kernel, (jacobian,), ("jacobian",))
    if jacobian is not None:
        _check_jacobian(jacobian, *ctx.samples.shape)
        t = _accumulate(ctx, jacobian, chunk_size)[1]
    else:
        t = _call_vjp(ctx, vjp, None)
    return ctx.in_units(t, 2, "t_matrix")


def _one_of(jacobian, vjp):
    if (jacobian is None) == (vjp is None):
        raise ValueError("pass exactly one of jacobian (N, d, q) and vjp (a callable)")
    if vjp is not None and not callable(vjp):
        raise TypeError(f"vjp must be callable; got {type(vjp).__name__}")


def _call_vjp(ctx: _Context, vjp: Callable, q: int | None):
    """``T̂ = ℓ² T``: the VJP of the cotangents in units of the bandwidth (``ℓ²`` times
    :func:`cotangents`; a VJP is linear, so its result is ``ℓ² T``), in the work dtype."""
    xp = ctx.xp
    n, d, m = ctx.shape
    t = vjp(ctx.rows(ctx.samples) / n)
    if not _backend.in_namespace(t, xp):
        raise TypeError(f"vjp must return an array of the samples' library; got {type(t).__name__}")
    if t.ndim != 2 or t.shape[0] != m or (q is not None and t.shape[1] != q):
        want = f"(M, q) = ({m}, {'q' if q is None else q})"
        raise ValueError(f"vjp must return shape {want}; got {tuple(t.shape)}")
    if t.dtype != ctx.samples.dtype:
        t = xp.astype(t, ctx.samples.dtype)
    _backend.require_finite(xp, t, "vjp output")
    return t


def _damping(xp, damping, t_white, floor: float):
    """``D`` for the solve (whose factorisation checks an array's type, shape and values)."""
    if isinstance(damping, str):
        if damping == "identity":
            return None
        if damping == "jacobian":
            return _damping_from_whitened(xp, t_white, floor)
        raise ValueError(f"damping must be 'identity', 'jacobian' or a positive array (q,); got {damping!r}")
    if not _backend.in_namespace(damping, xp):
        raise TypeError(
            f"damping must be 'identity', 'jacobian' or an array of the samples' library; got {damping!r}"
        )
    return damping


def kwng_direction(grad, samples, *, kernel: Kernel, basis: NystromBasis, eps: float,
                   lam: float = 0.0, damping="identity", jacobian=None, vjp=None,
                   rcond: float | None = None, chunk_size: int | None = None, form: str = "auto",
                   damping_floor: float = DAMPING_FLOOR):
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
        ``D``: identity; ``diag(Ĝ)^{-1/2}`` guarded by ``damping_floor``
        (:func:`damping_from_whitened`: parameters the outputs do not see are excluded from
        the solve and take the rule of :class:`WhitenedSolver`); or its diagonal, ``>= 0``.
    jacobian : array, shape (N, d, q), optional
        ``jacobian[n, i, :] = ∇_θ h_θ(Z_n)_i``.
    vjp : callable, optional
        Cotangents ``(M, N, d)`` → ``(M, q)`` (see :func:`t_matrix`). Exactly one of
        ``jacobian`` and ``vjp``.
    rcond : float, optional
        Spectral cut-off of :func:`whiten`.
    chunk_size : int, optional
        Samples per chunk of :func:`cc_gram`.
    form : {"auto", "primal", "dual", "dual-qr"}
        See :func:`factorize_whitened`.
    damping_floor : float
        The guard of ``damping="jacobian"``, ``D_jj = 1/(‖T̃_j‖ + damping_floor)``; default
        the authors' ``1e-8``.

    Returns
    -------
    array, shape (q,)
        In the namespace, dtype and device of the inputs (half precision is computed in
        ``float32`` and cast back). Always finite.

    Raises
    ------
    ValueError
        If an argument has a wrong value or shape, holds NaN or Inf, or the bandwidth makes the
        samples span more than the dtype's range; or if ``w`` overflows the dtype (``eps`` too
        small for this gradient). Every message names the argument.
    TypeError
        If an argument has a wrong type (a string or bool for a number, a float for a count,
        arrays of different libraries).

    Notes
    -----
    The computation runs in units of the bandwidth (module notes): samples, Jacobian and VJP
    scaled by ``s`` (with a bandwidth rule, or the bandwidth and ``damping_floor`` scaled by
    ``s``) and ``eps`` scaled by ``s²`` (by ``s`` with ``damping="jacobian"``) give ``w / s²`` to the
    dtype's precision, for any ``s`` the dtype holds.

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
    eps = _backend.check_positive_scalar(eps, "eps")
    damping_floor = _backend.check_positive_scalar(damping_floor, "damping_floor")
    form = _backend.check_choice(form, "form", ("auto", "primal", "dual", "dual-qr"))
    ctx, grad, t_white = _whitened_system(samples, basis, kernel, grad, "grad", jacobian, vjp,
                                          lam, rcond, chunk_size)
    return _direction(ctx, grad, t_white, eps, damping, form, damping_floor)


def _direction(ctx: _Context, grad, t_white, eps: float, damping, form: str, damping_floor: float):
    """``w`` from the whitened ``T̃`` and a ``grad`` checked at the door, in the output dtype."""
    xp = ctx.xp
    if not math.isfinite(_backend.max_abs(xp, t_white)):
        raise ValueError(f"T̃ overflows {t_white.dtype}: the jacobian (or the vjp's output) is too large")
    dmp = _damping(xp, damping, t_white, damping_floor)
    # grad was checked at the door (_context); the solve refuses a w out of range
    w = _solve_whitened(xp, t_white, grad, eps, dmp, form, check_finite=False)
    return _cast_back(xp, w, ctx.out, "the direction w")


def _whitened_system(samples, basis, kernel, vec, vec_name, jacobian, vjp, lam, rcond, chunk_size):
    """Validate; ``C Cᵀ`` and ``T`` (from the Jacobian or the VJP); whiten. Returns ``(ctx, vec, T̃)``."""
    _one_of(jacobian, vjp)
    lam = _backend.check_positive_scalar(lam, "lam", allow_zero=True)
    if rcond is not None:
        rcond = _backend.check_positive_scalar(rcond, "rcond", allow_zero=True)
    ctx, (vec, jacobian) = _context(samples, basis, kernel, (vec, jacobian), (vec_name, "jacobian"))
    if vec.ndim != 1:
        raise ValueError(f"{vec_name} must be 1-D (q,); got shape {tuple(vec.shape)}")
    q = vec.shape[0]
    if jacobian is not None:
        if _check_jacobian(jacobian, *ctx.samples.shape) != q:
            raise ValueError(f"jacobian's last axis must match {vec_name}: q = {q}; got {jacobian.shape[2]}")
        cc, t = _accumulate(ctx, jacobian, chunk_size)
    else:
        cc, _ = _accumulate(ctx, chunk_size=chunk_size)
        t = _call_vjp(ctx, vjp, q)
    return ctx, vec, _whiten_means(ctx, cc, t, lam, rcond)


def _whiten_means(ctx: _Context, cc, t, lam: float, rcond: float | None):
    """``T̃`` from ``Ĉ Ĉᵀ`` and ``T̂`` (:func:`_accumulate`) and validated ``lam``, ``rcond``."""
    # in units of the bandwidth: Ĉ Ĉᵀ + (λℓ²) K̂ = ℓ⁴ (C Cᵀ + λ K) and T̂ = ℓ² T give the same T̃
    lam_hat = lam * ctx.ell * ctx.ell
    if not math.isfinite(lam_hat):
        raise ValueError(f"lam · bandwidth² overflows: lam={lam!r}, bandwidth={ctx.ell!r}; use a smaller lam")
    k = _k(ctx) if lam > 0 else None
    return _whiten(ctx.xp, cc, t, k, lam_hat if lam_hat > 0 else 0.0, rcond, 1.0)


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
        In the namespace, dtype and device of the inputs.
    """
    ctx, v, t_white = _whitened_system(samples, basis, kernel, v, "v", jacobian, vjp, lam, rcond, chunk_size)
    return _apply_metric(ctx, v, t_white)


def _apply_metric(ctx: _Context, v, t_white):
    """``Ĝ v = T̃ᵀ (T̃ v)`` in the output dtype."""
    return _cast_back(ctx.xp, t_white.T @ (t_white @ v), ctx.out, "metric_apply")

r"""Translation-invariant kernels with analytic first and second derivatives.

A radial kernel with bandwidth :math:`\ell` is :math:`k(x, y) = \kappa(t)`,
:math:`t = \lVert x - y\rVert^2/\ell^2`: every computation runs in units of the bandwidth,
:math:`\hat u = (x - y)/\ell`, and the powers of :math:`\ell` are applied once at the end, so
that no squared distance or product of derivatives over- or underflows before the result
would (samples of any scale, with a bandwidth of that scale, give the same relative accuracy).
Every derivative the estimator needs follows from :math:`\kappa'` and :math:`\kappa''`:

.. math::

    \partial_{x_a} k = \frac{2\kappa'(t)\, \hat u_a}{\ell}, \qquad
    \partial_{x_a}\partial_{y_b} k
        = \frac{-2\kappa'(t)\,\delta_{ab} - 4\kappa''(t)\, \hat u_a \hat u_b}{\ell^2} .

Each kernel supplies :math:`(\kappa, \kappa', \kappa'')` (:meth:`Kernel.radial`); the shared base
class :class:`Kernel` does the rest, vectorised, in the namespace of its inputs.

**Range.** A result is refused with a ``ValueError`` naming ``bandwidth`` when its scale
(:math:`1/\ell` for gradients, :math:`1/\ell^2` for second derivatives) is not a normal number of
the output dtype, e.g. ``bandwidth=1e-200`` in float64: the true values are not representable.
Points more than :math:`\sqrt{\max}/4` bandwidths apart (``3e153`` in float64, ``4.6e18`` in
float32) count as infinitely far: there :math:`k` and its derivatives are 0 (exact to the
dtype for the Gaussian, whose values underflow long before).

**Half precision.** ``float16`` and ``bfloat16`` inputs are computed in ``float32`` and the
results cast back (:func:`~wngkernels._backend.work_dtype`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _backend

__all__ = ["Gaussian", "Kernel", "RationalQuadratic"]

Bandwidth = float | Callable[[Any, Any], float]


def _scaled_differences(xp, a, b, inv_ell: float):
    r"""``(a − b)/ℓ`` (broadcast), clipped to ``±sqrt(max)/4`` of the dtype.

    E.g. ``a = x[:, None, :]``, ``b = y[None, :, :]`` give ``û`` ``(n, m, d)``. Beyond the clip
    every kernel and derivative is 0 to the dtype's precision (see the module notes);
    clipping keeps ``û_a û_b`` finite, so that no ``0 · inf`` turns into NaN.
    """
    big = math.sqrt(float(xp.finfo(a.dtype).max)) / 4
    if not isinstance(inv_ell, (int, float)):  # a 0-d array (a bandwidth left on the device): halved
        u = (a * 0.5 - b * 0.5) * (2 * inv_ell)
    elif inv_ell == 1:
        u = a - b
    elif inv_ell < 1:  # halving is exact and keeps a − b in range; the product then cannot overflow
        u = (a * 0.5 - b * 0.5) * (2 * inv_ell)
    else:  # a − b overflows only where (a − b)/ℓ would: the clip takes it
        u = (a - b) * inv_ell
    return xp.clip(u, -big, big)


def _bandwidth_power(ell: float, power: int, dtype_info, what: str) -> float:
    r"""``ℓ^{-power}`` as a Python float, if it is a normal number of the output dtype.

    ``dtype_info`` is the dtype's ``finfo``; ``what`` names the result in the message. The
    kernels' normalised derivatives are at most 2 in magnitude, so ``4 ℓ^{-power} <= max``
    guarantees a finite result.
    """
    log_factor = -power * math.log(ell)
    hi, lo = float(dtype_info.max) / 4, float(dtype_info.smallest_normal)
    if log_factor > math.log(hi) or log_factor < math.log(lo):
        way = "small" if log_factor > 0 else "large"
        raise ValueError(
            f"bandwidth={ell!r} is too {way} for {what} in dtype {dtype_info.dtype}: its values scale "
            f"as 1/bandwidth^{power} = 1e{log_factor / math.log(10):+.0f}, outside the dtype's range "
            f"[{lo:.3g}, {hi:.3g}]; rescale the data (and the bandwidth) or use a wider dtype"
        )
    return math.exp(log_factor)


def coordinate_onehot(xp, dims, n: int, d: int, like, name: str = "dims"):
    """Validate coordinate indices and return their one-hot matrix ``E`` ``(n, d)``.

    ``dims`` may be a sequence, a NumPy array, or an integer array of ``like``'s
    namespace (kept on its device); ``E[m, a] = 1`` where ``a == dims[m]``, in
    ``like``'s dtype and on its device.
    """
    on_device = not isinstance(dims, (np.ndarray, list, tuple)) and _backend.in_namespace(dims, xp)
    if on_device:
        shape, lo, hi = tuple(dims.shape), None, None
        if dims.ndim == 1 and not xp.isdtype(dims.dtype, "integral"):
            raise TypeError(f"{name} must hold integers; got dtype {dims.dtype}")
        if dims.ndim == 1 and dims.shape[0] == n and n:
            lo, hi = int(xp.min(dims)), int(xp.max(dims))
        idx = dims
    else:
        host = np.asarray(dims)
        shape = host.shape
        if host.ndim == 1 and host.size and not np.issubdtype(host.dtype, np.integer):
            raise TypeError(f"{name} must hold integers; got dtype {host.dtype}")
        lo, hi = (int(host.min()), int(host.max())) if host.ndim == 1 and host.size else (0, 0)
        idx = None if host.ndim != 1 else host.astype(np.int64, copy=True)
    if len(shape) != 1 or shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},); got {shape}")
    if n and (lo < 0 or hi >= d):
        raise ValueError(f"{name} must lie in [0, {d}); got values in [{lo}, {hi}]")
    dev = _backend.device(like)
    if not on_device:
        idx = xp.asarray(idx, device=dev)
    cols = xp.arange(d, device=dev)
    return xp.astype(idx[:, None] == cols[None, :], like.dtype)


class Kernel:
    r"""Base class of radial kernels :math:`k(x, y) = \varphi(\lVert x-y\rVert^2)`.

    Subclasses implement :meth:`radial`. All methods take arrays of one library
    (NumPy, CuPy, PyTorch, any array-API library) and return arrays of that library,
    dtype and device; integer inputs are promoted to the library's default float.

    Parameters
    ----------
    bandwidth : float or callable
        The length scale :math:`\ell > 0`, or a rule ``rule(y, x) -> float`` from
        :mod:`wngkernels.bandwidth` that :meth:`resolve` evaluates on the data. Methods
        called on a kernel whose bandwidth is a rule evaluate it on their own two
        arguments; the estimator resolves it once instead, on basis and samples.
    """

    def __init__(self, bandwidth: Bandwidth = 1.0):
        if not callable(bandwidth):  # a rule is called at each estimate; a number is checked now
            bandwidth = _backend.check_positive_scalar(bandwidth, "bandwidth")
        self.bandwidth = bandwidth

    # -- to be provided by subclasses -------------------------------------------------
    def radial(self, xp, t):
        r"""Return :math:`(\kappa(t), \kappa'(t), \kappa''(t))` for squared distances ``t`` in units of
        the bandwidth (``t = ‖x − y‖²/ℓ²``, possibly ``inf``: the limits there).

        Subclasses implement it; the base class applies the powers of ``ℓ``. It must satisfy
        ``|2κ'(t)| + |4κ''(t)| t <= 2`` (true of both kernels here).
        """
        raise NotImplementedError

    def _params(self) -> dict:
        return {"bandwidth": self.bandwidth}

    # -- bandwidth ---------------------------------------------------------------------
    def with_bandwidth(self, bandwidth: Bandwidth) -> Kernel:
        """A copy of this kernel with another bandwidth (float or rule)."""
        params = self._params()
        params["bandwidth"] = bandwidth
        return type(self)(**params)

    def resolve(self, y, x) -> Kernel:
        """A copy with a float bandwidth: the rule evaluated on ``y`` ``(M, d)`` and ``x`` ``(N, d)``.

        A kernel whose bandwidth is already a float is returned unchanged.
        """
        if not callable(self.bandwidth):
            return self
        return self.with_bandwidth(self.bandwidth(y, x))

    def _ell(self, x, y) -> float:
        return self.resolve(x, y).bandwidth

    def _prepare(self, x, y, names=("x", "y")):
        """Validated ``(xp, x, y, out_dtype, ell)``; ``x``, ``y`` in the work dtype."""
        xp, x, y = _backend.float_pair(x, y, names=names)
        out = x.dtype
        work = _backend.work_dtype(xp, out)
        if work != out:
            x, y = xp.astype(x, work), xp.astype(y, work)
        return xp, x, y, out, self._ell(x, y)

    @staticmethod
    def _cast(xp, a, out):
        return a if a.dtype == out else xp.astype(a, out)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._params() == other._params()

    def __hash__(self):
        return hash((type(self), tuple(self._params().items())))

    # -- values and derivatives --------------------------------------------------------
    def __call__(self, x, y):
        r"""Kernel matrix.

        Parameters
        ----------
        x : array, shape (n, d)
        y : array, shape (m, d)

        Returns
        -------
        array, shape (n, m)
            ``[n, m] = k(x_n, y_m)``.
        """
        xp, x, y, out, ell = self._prepare(x, y)
        with _backend.ignore_overflow():  # t = inf: out of reach, the limit 0 (module notes)
            u = _scaled_differences(xp, x[:, None, :], y[None, :, :], 1.0 / ell)
            phi, _, _ = self.radial(xp, xp.vecdot(u, u))
        return self._cast(xp, phi, out)

    def grad_x(self, x, y):
        r"""Gradient in the first argument.

        Parameters
        ----------
        x : array, shape (n, d)
        y : array, shape (m, d)

        Returns
        -------
        array, shape (n, m, d)
            ``[n, m, a] = ∂_{x_a} k(x_n, y_m) = 2 φ'(s) (x_n − y_m)_a``.
        """
        xp, x, y, out, ell = self._prepare(x, y)
        factor = _bandwidth_power(ell, 1, xp.finfo(out), "grad_x")
        with _backend.ignore_overflow():
            u = _scaled_differences(xp, x[:, None, :], y[None, :, :], 1.0 / ell)
            _, dphi, _ = self.radial(xp, xp.vecdot(u, u))
            g = (2 * factor) * dphi[..., None] * u
        return self._cast(xp, g, out)

    def cross_hessian(self, x, y):
        r"""Mixed second derivative, one ``d × d`` block per pair of points.

        Parameters
        ----------
        x : array, shape (n, d)
        y : array, shape (m, d)

        Returns
        -------
        array, shape (n, m, d, d)
            ``[n, m, a, b] = ∂_{x_a} ∂_{y_b} k(x_n, y_m)
            = −2 φ'(s) δ_ab − 4 φ''(s) u_a u_b`` with ``u = x_n − y_m``.
        """
        xp, x, y, out, ell = self._prepare(x, y)
        factor = _bandwidth_power(ell, 2, xp.finfo(out), "cross_hessian")
        eye = xp.eye(x.shape[1], dtype=x.dtype, device=_backend.device(x))
        with _backend.ignore_overflow():
            u = _scaled_differences(xp, x[:, None, :], y[None, :, :], 1.0 / ell)
            _, dphi, d2phi = self.radial(xp, xp.vecdot(u, u))
            # (κ'' û_a) û_b: never 0 · inf where the points are out of reach
            uu = ((4 * d2phi)[..., None] * u)[..., :, None] * u[..., None, :]
            h = (-2 * dphi)[..., None, None] * eye - uu
        return self._cast(xp, factor * h, out)

    def cross_hessian_rows(self, x, dims, y):
        r"""Rows of the cross Hessian selected by one coordinate per point of ``x``.

        The form the estimator needs (the mathematics page, "The kernelized estimator"),
        computed without the ``d × d`` blocks:

        Parameters
        ----------
        x : array, shape (M, d)
            The basis points ``Y_m``.
        dims : sequence of int or integer array, shape (M,)
            The coordinate ``i_m ∈ [0, d)`` of each row.
        y : array, shape (N, d)
            The samples ``X_n``.

        Returns
        -------
        array, shape (M, N, d)
            ``[m, n, b] = ∂_{x_{i_m}} ∂_{y_b} k(x_m, y_n)
            = −2 φ'(s) δ_{i_m b} − 4 φ''(s) u_{i_m} u_b``, ``u = x_m − y_n``;
            equal to ``cross_hessian(x, y)[m, n, dims[m], :]``.
        """
        xp, x, y, out, ell = self._prepare(x, y)
        onehot = coordinate_onehot(xp, dims, x.shape[0], x.shape[1], x)
        return self._cast(xp, self._rows_unchecked(xp, x, onehot, y, ell, out), out)

    def _rows_unchecked(self, xp, x, onehot, y, ell: float, out):
        """:meth:`cross_hessian_rows` on inputs its caller has validated (finite, one work dtype,
        ``onehot`` ``(M, d)``, ``ell`` the float bandwidth): reads nothing back from the arrays.
        ``out``: the dtype whose range the factor ``ℓ⁻²`` must fit."""
        factor = _bandwidth_power(ell, 2, xp.finfo(out), "cross_hessian_rows")
        return factor * self._rows(xp, x, onehot, y, 1.0 / ell)

    def _rows_deferred(self, xp, x, onehot, y, ell, out):
        """:meth:`_rows_unchecked` with ``ell`` a 0-d array on the device
        (:meth:`~wngkernels.AuthorsRule.deferred`): reads nothing back. A NaN ``ell``, or one
        whose ``ℓ⁻²`` is not a normal number of ``out`` below a quarter of its largest, gives
        NaN rows (where :meth:`_rows_unchecked` raises)."""
        info = xp.finfo(out)
        inv = 1.0 / ell
        factor = inv * inv
        factor = xp.where((factor >= float(info.smallest_normal)) & (factor <= float(info.max) / 4),
                          factor, math.nan)
        return xp.astype(factor, x.dtype) * self._rows(xp, x, onehot, y, xp.astype(inv, x.dtype))

    def _rows(self, xp, x, onehot, y, inv_ell: float = 1.0):
        """:meth:`cross_hessian_rows` times ``ℓ²`` (in units of the bandwidth), on validated
        inputs (``onehot`` is ``(M, d)``; ``inv_ell = 1/ℓ``, or ``1`` for points already in
        units of the bandwidth)."""
        with _backend.ignore_overflow():
            u = _scaled_differences(xp, x[:, None, :], y[None, :, :], inv_ell)
            # û[m, n, i_m] without a second (M, N, d) temporary
            u_sel = _scaled_differences(xp, xp.sum(x * onehot, axis=1)[:, None], onehot @ y.T, inv_ell)
            alpha, beta = self._row_coefficients(xp, xp.vecdot(u, u), u_sel)
            return alpha[..., None] * u + beta[..., None] * onehot[:, None, :]

    def _row_coefficients(self, xp, t, u_sel):
        """``(α, β)``, each ``(M, N)``, with row ``[m, n, :] = α û + β e_{i_m}`` (``û = (x_m − y_n)/ℓ``),
        in units of the bandwidth (the row of the cross Hessian times ``ℓ²``).

        From ``ℓ² ∂_{x_a}∂_{y_b} k = −2κ'(t) δ_ab − 4κ''(t) û_a û_b`` at ``a = i_m``:
        ``α = −4 κ''(t) û_{i_m}`` and ``β = −2 κ'(t)``, for squared distances ``t = ‖û‖²`` and
        selected differences ``u_sel = û_{i_m}``.
        """
        _, dphi, d2phi = self.radial(xp, t)
        return -4 * d2phi * u_sel, -2 * dphi

    def cross_hessian_selected(self, x, dims_x, y, dims_y):
        r"""Entries of the cross Hessian selected by one coordinate per point on both sides.

        Parameters
        ----------
        x : array, shape (M, d)
        dims_x : sequence of int or integer array, shape (M,)
        y : array, shape (P, d)
        dims_y : sequence of int or integer array, shape (P,)

        Returns
        -------
        array, shape (M, P)
            ``[m, p] = ∂_{x_{i_m}} ∂_{y_{j_p}} k(x_m, y_p)``; with ``x = y`` the Nyström
            basis points this is the matrix ``K`` of the estimator.
        """
        xp, x, y, out, ell = self._prepare(x, y)
        factor = _bandwidth_power(ell, 2, xp.finfo(out), "cross_hessian_selected")
        ex = coordinate_onehot(xp, dims_x, x.shape[0], x.shape[1], x, "dims_x")
        ey = coordinate_onehot(xp, dims_y, y.shape[0], y.shape[1], y, "dims_y")
        return self._cast(xp, factor * self._selected(xp, x, ex, y, ey, 1.0 / ell), out)

    def basis_gram(self, points, dims):
        r"""The matrix ``K`` of the estimator: the cross Hessian selected at the basis on both sides.

        Parameters
        ----------
        points : array, shape (M, d)
            The basis points ``Y_m``.
        dims : sequence of int or integer array, shape (M,)
            Their coordinates ``i_m``.

        Returns
        -------
        array, shape (M, M)
            ``K[m, m'] = ∂_{x_{i_m}} ∂_{y_{i_{m'}}} k(Y_m, Y_{m'})``, the Gram matrix of the basis
            functions in the RKHS; symmetric (the mean of
            :meth:`cross_hessian_selected` ``(points, dims, points, dims)`` and its transpose, which
            differ by rounding only).
        """
        xp, x, _, out, ell = self._prepare(points, points, names=("points", "points"))
        onehot = coordinate_onehot(xp, dims, x.shape[0], x.shape[1], x, "dims")
        factor = _bandwidth_power(ell, 2, xp.finfo(out), "basis_gram")
        return self._cast(xp, factor * self._basis_gram(xp, x, onehot, 1.0 / ell), out)

    def _basis_gram(self, xp, y, onehot, inv_ell: float = 1.0):
        """:meth:`basis_gram` times ``ℓ²`` on validated inputs (reads nothing back)."""
        k = self._selected(xp, y, onehot, y, onehot, inv_ell)
        return (k + k.T) / 2

    def _selected(self, xp, x, ex, y, ey, inv_ell: float = 1.0):
        """:meth:`cross_hessian_selected` times ``ℓ²`` on validated inputs (one-hot ``ex``, ``ey``)."""
        with _backend.ignore_overflow():
            u = _scaled_differences(xp, x[:, None, :], y[None, :, :], inv_ell)
            _, dphi, d2phi = self.radial(xp, xp.vecdot(u, u))
            ua = _scaled_differences(xp, xp.sum(x * ex, axis=1)[:, None], ex @ y.T, inv_ell)  # û[m, p, i_m]
            ub = _scaled_differences(xp, x @ ey.T, xp.sum(y * ey, axis=1)[None, :], inv_ell)  # û[m, p, j_p]
            return -2 * dphi * (ex @ ey.T) - 4 * d2phi * ua * ub  # (κ'' û_a) û_b: no 0 · inf


class Gaussian(Kernel):
    r"""Gaussian kernel :math:`k(x, y) = \exp(-\lVert x-y\rVert^2 / (2\ell^2))`.

    .. math::

        \partial_{x_a} k = -\frac{(x_a - y_a)}{\ell^2} k, \qquad
        \partial_{x_a}\partial_{y_b} k = k\Big(\frac{\delta_{ab}}{\ell^2}
            - \frac{(x_a-y_a)(x_b-y_b)}{\ell^4}\Big).

    Parameters
    ----------
    bandwidth : float or callable
        :math:`\ell > 0`, or a rule from :mod:`wngkernels.bandwidth`.

    Examples
    --------
    >>> import numpy as np
    >>> from wngkernels import Gaussian
    >>> k = Gaussian(bandwidth=1.0)
    >>> x = np.zeros((1, 2)); y = np.ones((1, 2))
    >>> float(k(x, y)[0, 0]) == float(np.exp(-1.0))
    True
    >>> k.cross_hessian(x, y).shape
    (1, 1, 2, 2)
    """

    def radial(self, xp, t):
        phi = xp.exp(-0.5 * t)
        return phi, -0.5 * phi, 0.25 * phi


class RationalQuadratic(Kernel):
    r"""Rational-quadratic kernel :math:`k(x, y) = (1 + \lVert x-y\rVert^2/(2\alpha\ell^2))^{-\alpha}`.

    With :math:`s_\alpha = 1 + \lVert x-y\rVert^2/(2\alpha\ell^2)`:

    .. math::

        \partial_{x_a} k = -\frac{x_a - y_a}{\ell^2} s_\alpha^{-\alpha-1}, \qquad
        \partial_{x_a}\partial_{y_b} k = \frac{\delta_{ab}}{\ell^2} s_\alpha^{-\alpha-1}
            - \frac{\alpha+1}{\alpha}\frac{(x_a-y_a)(x_b-y_b)}{\ell^4} s_\alpha^{-\alpha-2}.

    Parameters
    ----------
    bandwidth : float or callable
        :math:`\ell > 0`, or a rule from :mod:`wngkernels.bandwidth`.
    alpha : float
        Shape :math:`\alpha > 0`; :math:`\alpha \to \infty` gives the Gaussian kernel.
    """

    def __init__(self, bandwidth: Bandwidth = 1.0, alpha: float = 1.0):
        super().__init__(bandwidth)
        self.alpha = _backend.check_positive_scalar(alpha, "alpha")

    def _params(self) -> dict:
        return {"bandwidth": self.bandwidth, "alpha": self.alpha}

    def radial(self, xp, t):
        a = self.alpha
        c = 1.0 / (2.0 * a)
        base = 1.0 + c * t
        # powers through exp/log: one transcendental pair, accurate for any alpha
        log_base = xp.log(base)
        phi = xp.exp(-a * log_base)
        p1 = phi / base  # base^(-a-1)
        return phi, -a * c * p1, a * (a + 1) * c * c * (p1 / base)



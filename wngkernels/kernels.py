r"""Translation-invariant kernels with analytic first and second derivatives.

A radial kernel is :math:`k(x, y) = \varphi(s)` with :math:`s = \lVert x - y\rVert^2`.
With :math:`u = x - y`, every derivative the estimator needs follows from
:math:`\varphi'` and :math:`\varphi''` (derivatives in :math:`s`):

.. math::

    \partial_{x_a} k = 2\varphi'(s)\, u_a, \qquad
    \partial_{x_a}\partial_{y_b} k = -2\varphi'(s)\,\delta_{ab} - 4\varphi''(s)\, u_a u_b .

Each kernel supplies :math:`(\varphi, \varphi', \varphi'')`; the shared base class
:class:`Kernel` does the rest, vectorised, in the namespace of its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import _backend

__all__ = ["Gaussian", "Kernel", "RationalQuadratic"]

Bandwidth = float | Callable[[Any, Any], float]


def _check_bandwidth(bandwidth: Bandwidth) -> Bandwidth:
    if callable(bandwidth):
        return bandwidth
    return _backend.check_positive_scalar(bandwidth, "bandwidth")


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
        self.bandwidth = _check_bandwidth(bandwidth)

    # -- to be provided by subclasses -------------------------------------------------
    def radial(self, xp, s, ell: float):
        r"""Return :math:`(\varphi(s), \varphi'(s), \varphi''(s))` for squared distances ``s``."""
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
        xp, x, y = _backend.float_pair(x, y)
        u = x[:, None, :] - y[None, :, :]
        phi, _, _ = self.radial(xp, xp.vecdot(u, u), self._ell(x, y))
        return phi

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
        xp, x, y = _backend.float_pair(x, y)
        u = x[:, None, :] - y[None, :, :]
        _, dphi, _ = self.radial(xp, xp.vecdot(u, u), self._ell(x, y))
        return 2 * dphi[..., None] * u

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
        xp, x, y = _backend.float_pair(x, y)
        u = x[:, None, :] - y[None, :, :]
        _, dphi, d2phi = self.radial(xp, xp.vecdot(u, u), self._ell(x, y))
        eye = xp.eye(x.shape[1], dtype=x.dtype, device=_backend.device(x))
        return (-2 * dphi)[..., None, None] * eye - (4 * d2phi)[..., None, None] * (
            u[..., :, None] * u[..., None, :]
        )

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
        xp, x, y = _backend.float_pair(x, y)
        onehot = coordinate_onehot(xp, dims, x.shape[0], x.shape[1], x)
        return self._rows(xp, x, onehot, y, self._ell(x, y))

    def _rows(self, xp, x, onehot, y, ell: float):
        """:meth:`cross_hessian_rows` on validated inputs (``onehot`` is ``(M, d)``)."""
        u = x[:, None, :] - y[None, :, :]
        # u[m, n, i_m] = x[m, i_m] - y[n, i_m], without an (M, N, d) temporary
        u_sel = xp.sum(x * onehot, axis=1)[:, None] - onehot @ y.T
        alpha, beta = self._row_coefficients(xp, xp.vecdot(u, u), u_sel, ell)
        return alpha[..., None] * u + beta[..., None] * onehot[:, None, :]

    def _row_coefficients(self, xp, s, u_sel, ell: float):
        """``(α, β)``, each ``(M, N)``, with row ``[m, n, :] = α u + β e_{i_m}`` (``u = x_m − y_n``).

        From ``∂_{x_a}∂_{y_b} k = −2φ'(s) δ_ab − 4φ''(s) u_a u_b`` at ``a = i_m``:
        ``α = −4 φ''(s) u_{i_m}`` and ``β = −2 φ'(s)``, for squared distances ``s`` and selected
        differences ``u_sel = u_{i_m}``.
        """
        _, dphi, d2phi = self.radial(xp, s, ell)
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
        xp, x, y = _backend.float_pair(x, y)
        ex = coordinate_onehot(xp, dims_x, x.shape[0], x.shape[1], x, "dims_x")
        ey = coordinate_onehot(xp, dims_y, y.shape[0], y.shape[1], y, "dims_y")
        return self._selected(xp, x, ex, y, ey, self._ell(x, y))

    def _selected(self, xp, x, ex, y, ey, ell: float):
        """:meth:`cross_hessian_selected` on validated inputs (one-hot ``ex``, ``ey``)."""
        u = x[:, None, :] - y[None, :, :]
        _, dphi, d2phi = self.radial(xp, xp.vecdot(u, u), ell)
        ua = xp.sum(x * ex, axis=1)[:, None] - ex @ y.T  # u[m, p, i_m]
        ub = x @ ey.T - xp.sum(y * ey, axis=1)[None, :]  # u[m, p, j_p]
        return -2 * dphi * (ex @ ey.T) - 4 * d2phi * ua * ub


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

    def radial(self, xp, s, ell: float):
        inv = 1.0 / (2.0 * ell * ell)
        phi = xp.exp(-s * inv)
        return phi, -inv * phi, (inv * inv) * phi


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

    def radial(self, xp, s, ell: float):
        a = self.alpha
        c = 1.0 / (2.0 * a * ell * ell)
        base = 1.0 + c * s
        # powers through exp/log: one transcendental pair, accurate for any alpha
        log_base = xp.log(base)
        phi = xp.exp(-a * log_base)
        p1 = phi / base  # base^(-a-1)
        return phi, -a * c * p1, a * (a + 1) * c * c * (p1 / base)



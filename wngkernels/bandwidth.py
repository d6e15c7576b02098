"""Bandwidth rules: functions of the data that return a kernel bandwidth ``ℓ``.

A kernel's ``bandwidth`` is either a positive float or one of these rules; the
estimator resolves a rule once per estimate, on the basis points ``Y`` (shape
``(M, d)``) and the samples ``X`` (shape ``(N, d)``), with
:meth:`wngkernels.kernels.Kernel.resolve`.

Each rule reads scalars back to the host (the bandwidth is a Python float), so that an
unusable bandwidth (all points equal, or beyond the float range) is refused with a clear
``ValueError``; :meth:`AuthorsRule.deferred` leaves the bandwidth on the device instead (NaN
where the call raises). The points are first divided by a power of two near their largest magnitude
(exact), so that no squared distance over- or underflows: samples of any scale give the
bandwidth of that scale. Half-precision inputs are computed in ``float32``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from . import _backend

__all__ = ["AuthorsRule", "MedianHeuristic"]


def _normalised(y, x):
    """``(xp, y/c, x/c, c)`` with ``c`` a power of two near ``max(|y|, |x|)`` (1 if all are 0).

    One scalar read: the largest entry, which is also the finiteness check (NaN and Inf propagate
    through ``max``); only where it fails are ``y`` and ``x`` read again, to name the culprit."""
    xp, y, x = _backend.float_pair(y, x, names=("y", "x"), check_finite=False)
    work = _backend.work_dtype(xp, x.dtype)
    if work != x.dtype:
        y, x = xp.astype(y, work), xp.astype(x, work)
    big = _backend.max_abs(xp, y, x)
    if not math.isfinite(big):
        _backend.require_finite(xp, y, "y")
        _backend.require_finite(xp, x, "x")
    c = _backend.pow2_below(big) if big > 0 else 1.0
    return xp, y / c, x / c, c


def _bandwidth(rule: str, log_c: float, log_sq: float, log10_factor: float = 0.0, hint: str = "") -> float:
    """``ℓ = c · sqrt(10^log10_factor · sq)`` from logarithms, or a ``ValueError`` naming the rule."""
    if log_sq == -math.inf:
        raise ValueError(f"{rule} gave bandwidth 0.0: the points are all equal; "
                         "pass a fixed bandwidth instead")
    log_ell = log_c + 0.5 * (log10_factor * math.log(10.0) + log_sq)
    if not math.log(sys.float_info.min) < log_ell < math.log(sys.float_info.max):
        raise ValueError(
            f"{rule} gave bandwidth 1e{log_ell / math.log(10):+.0f}{hint}, beyond the float range "
            f"[{sys.float_info.min:.3g}, {sys.float_info.max:.3g}]; pass a fixed bandwidth instead"
        )
    return math.exp(log_ell)


def _log(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


@dataclass(frozen=True)
class AuthorsRule:
    r"""The bandwidth rule of the KWNG authors' code.

    .. math:: \ell^2 = 10^{\mathrm{log\_bandwidth}} \cdot
              \frac{1}{MN} \sum_{m,n} \lVert Y_m - X_n \rVert^2

    computed in :math:`O((M + N) d)` as
    :math:`\frac1M\sum_m\lVert Y_m-\bar X\rVert^2 + \frac1N\sum_n\lVert X_n-\bar X\rVert^2`
    (exact, and free of the cancellation of the expanded form).

    Parameters
    ----------
    log_bandwidth : float
        Base-10 logarithm of the factor applied to the mean squared distance.
    """

    log_bandwidth: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "log_bandwidth", _backend.check_real(self.log_bandwidth, "log_bandwidth"))

    def __call__(self, y, x) -> float:
        """Bandwidth ``ℓ`` for basis points ``y`` ``(M, d)`` and samples ``x`` ``(N, d)``.

        Raises
        ------
        ValueError
            If the points are all equal (``ℓ = 0``), or ``ℓ`` is beyond the float range (e.g.
            ``log_bandwidth=700``).
        """
        xp, y, x, c = _normalised(y, x)
        center = xp.mean(x, axis=0)
        spread = xp.mean(xp.sum((x - center) ** 2, axis=1))
        return self.from_mean_square(float(self._mean_square(xp, y, center, spread)), scale=c)

    def deferred(self, y, x):
        r"""``ℓ`` as a 0-d ``float64`` array on the points' device, reading nothing back.

        The same rule as calling the instance, for callers that must not wait for the device (a
        training step: the bandwidth feeds the kernel rows while the queued work runs). Where the
        call raises ``ValueError`` (points not finite, all equal, ``ℓ`` beyond the float range),
        ``ℓ`` is NaN, and so is everything computed from it.

        Parameters
        ----------
        y : array, shape (M, d)
            Basis points.
        x : array, shape (N, d)
            Samples, of ``y``'s library, device and floating dtype.

        Returns
        -------
        array, shape ()
            ``ℓ``, or NaN.
        """
        xp = _backend.namespace(y, x, names=("y", "x"))
        with _backend.ignore_overflow():  # non-finite points and an overflowing ℓ are the NaN below
            return self._deferred(xp, y, x)

    def _deferred(self, xp, y, x):
        work = _backend.work_dtype(xp, x.dtype)
        y, x = xp.astype(y, work), xp.astype(x, work)
        big = xp.astype(xp.maximum(xp.max(xp.abs(y)), xp.max(xp.abs(x))), xp.float64)
        usable = xp.isfinite(big) & (big > 0)
        c = _backend.pow2_below_array(xp, big)  # a power of two: exact to divide by
        y, x = y / xp.astype(c, work), x / xp.astype(c, work)
        center = xp.mean(x, axis=0)
        mean_sq = xp.astype(self._mean_square(xp, y, center, xp.mean(xp.sum((x - center) ** 2, axis=1))),
                            xp.float64)
        log_ell = xp.log(c) + 0.5 * (self.log_bandwidth * math.log(10.0)
                                     + xp.log(xp.where(mean_sq > 0, mean_sq, 1.0)))
        inside = (log_ell > math.log(sys.float_info.min)) & (log_ell < math.log(sys.float_info.max))
        return xp.where(usable & (mean_sq > 0) & inside, xp.exp(log_ell), math.nan)

    @staticmethod
    def _mean_square(xp, y, center, spread):
        r"""The centred form :math:`\frac1M\sum_m\lVert Y_m-\bar X\rVert^2 + s`, ``s`` the samples'
        mean squared deviation from their mean ``center`` (0-d array): the mean squared distance
        of every pair. The data-parallel preconditioner passes ``center`` and ``s`` reduced over
        its processes."""
        return xp.mean(xp.sum((y - center) ** 2, axis=1)) + spread

    def from_mean_square(self, mean_sq: float, *, scale: float = 1.0) -> float:
        r"""``ℓ`` from the mean squared distance :math:`\frac{1}{MN}\sum_{m,n}\lVert Y_m - X_n\rVert^2`
        of points divided by ``scale``: ``ℓ = scale · sqrt(10^log_bandwidth · mean_sq)``, computed
        in logarithms (any ``log_bandwidth``). For callers that reduce the mean over several
        processes (the data-parallel preconditioner).

        Raises
        ------
        ValueError
            If ``mean_sq`` is 0 (all points equal) or ``ℓ`` is beyond the float range.
        """
        return _bandwidth("AuthorsRule", math.log(scale), _log(mean_sq), self.log_bandwidth,
                          f" (with log_bandwidth={self.log_bandwidth!r})")


@dataclass(frozen=True)
class MedianHeuristic:
    r"""The median heuristic: ``ℓ = sqrt(median_{m,n} ‖Y_m − X_n‖²)``.

    Distances between ``y`` and ``x`` (pairs of coincident points, distance 0, are
    left out). To keep the cost bounded, at most ``max_points`` of each are used:
    the first ones, which for i.i.d. samples is an unbiased subsample.

    Parameters
    ----------
    max_points : int
        Largest number of rows of ``y`` and of ``x`` that enter the median.
    """

    max_points: int = 1000

    def __post_init__(self):
        object.__setattr__(self, "max_points", _backend.check_int(self.max_points, "max_points", minimum=1))

    def __call__(self, y, x) -> float:
        """Bandwidth ``ℓ`` for basis points ``y`` ``(M, d)`` and samples ``x`` ``(N, d)``.

        Raises
        ------
        ValueError
            If all pairs of points coincide (``ℓ = 0``).
        """
        xp, y, x, c = _normalised(y, x)
        y = y[: min(self.max_points, y.shape[0]), :]
        x = x[: min(self.max_points, x.shape[0]), :]
        sq = xp.sum((y[:, None, :] - x[None, :, :]) ** 2, axis=-1)
        sq = xp.reshape(sq, (-1,))
        sq = xp.sort(sq[sq > 0])
        n = sq.shape[0]
        mid = 0.0 if n == 0 else float((sq[(n - 1) // 2] + sq[n // 2]) / 2)
        return _bandwidth("MedianHeuristic", math.log(c), _log(mid))

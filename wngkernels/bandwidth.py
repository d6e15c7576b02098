"""Bandwidth rules: functions of the data that return a kernel bandwidth ``ℓ``.

A kernel's ``bandwidth`` is either a positive float or one of these rules; the
estimator resolves a rule once per estimate, on the basis points ``Y`` (shape
``(M, d)``) and the samples ``X`` (shape ``(N, d)``), with
:meth:`wngkernels.kernels.Kernel.resolve`.

Each rule reads one scalar back to the host (the bandwidth is a Python float), so
that an unusable bandwidth (all points equal) is refused with a clear error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import _backend

__all__ = ["AuthorsRule", "MedianHeuristic"]


def _checked(value: float, rule: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{rule} gave bandwidth {value!r}: the points are all equal (or overflow); "
            "pass a fixed bandwidth instead"
        )
    return value


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
        if not math.isfinite(float(self.log_bandwidth)):
            raise ValueError(f"log_bandwidth must be finite; got {self.log_bandwidth!r}")

    def __call__(self, y, x) -> float:
        """Bandwidth ``ℓ`` for basis points ``y`` ``(M, d)`` and samples ``x`` ``(N, d)``."""
        xp, y, x = _backend.float_pair(y, x, names=("y", "x"))
        center = xp.mean(x, axis=0)
        mean_sq = xp.mean(xp.sum((y - center) ** 2, axis=1)) + xp.mean(
            xp.sum((x - center) ** 2, axis=1)
        )
        return _checked(math.sqrt(10.0 ** float(self.log_bandwidth) * float(mean_sq)), "AuthorsRule")


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
        if int(self.max_points) < 1:
            raise ValueError(f"max_points must be >= 1; got {self.max_points!r}")

    def __call__(self, y, x) -> float:
        """Bandwidth ``ℓ`` for basis points ``y`` ``(M, d)`` and samples ``x`` ``(N, d)``."""
        xp, y, x = _backend.float_pair(y, x, names=("y", "x"))
        y = y[: self.max_points, :]
        x = x[: self.max_points, :]
        sq = xp.sum((y[:, None, :] - x[None, :, :]) ** 2, axis=-1)
        sq = xp.reshape(sq, (-1,))
        sq = xp.sort(sq[sq > 0])
        if sq.shape[0] == 0:
            return _checked(0.0, "MedianHeuristic")
        n = sq.shape[0]
        mid = (sq[(n - 1) // 2] + sq[n // 2]) / 2
        return _checked(math.sqrt(float(mid)), "MedianHeuristic")

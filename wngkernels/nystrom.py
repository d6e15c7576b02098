"""Nyström basis: ``M`` pairs (sample index, coordinate) that span the estimator's functions.

The basis functions are :math:`\\partial_{i_m} k(Y_m, \\cdot)` with :math:`Y_m = X_{n_m}` one
of the samples and :math:`i_m` one coordinate (the mathematics page, "The kernelized
estimator"). Indices are drawn on the host with NumPy, so one seed gives the same basis on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _backend

__all__ = ["NystromBasis", "nystrom_basis"]


def _int_vector(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (M,); got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers; got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class NystromBasis:
    """A Nyström basis: ``M`` pairs ``(indices[m], dims[m])``.

    Both arrays are stored as read-only NumPy ``int64`` arrays on the host.

    Parameters
    ----------
    indices : array_like of int, shape (M,)
        Sample index ``n_m`` of each basis point ``Y_m = X[n_m]``.
    dims : array_like of int, shape (M,)
        Coordinate ``i_m`` of each basis function ``∂_{i_m} k(Y_m, ·)``.
    """

    indices: np.ndarray
    dims: np.ndarray

    def __post_init__(self):
        indices = _int_vector(self.indices, "indices")
        dims = _int_vector(self.dims, "dims")
        if indices.shape != dims.shape:
            raise ValueError(
                f"indices and dims must have the same length; got {indices.size} and {dims.size}"
            )
        if indices.size == 0:
            raise ValueError("a Nyström basis needs at least one pair (M >= 1)")
        if indices.min() < 0 or dims.min() < 0:
            raise ValueError("indices and dims must be >= 0")
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "dims", dims)

    @property
    def num_basis(self) -> int:
        """``M``, the number of basis functions."""
        return int(self.indices.size)

    def check(self, num_samples: int, num_features: int) -> None:
        """Raise ``ValueError`` unless every pair fits samples of shape ``(num_samples, num_features)``."""
        if self.indices.max() >= num_samples:
            raise ValueError(
                f"basis indices must be < N = {num_samples}; got max {int(self.indices.max())}"
            )
        if self.dims.max() >= num_features:
            raise ValueError(f"basis dims must be < d = {num_features}; got max {int(self.dims.max())}")

    @classmethod
    def exact(cls, num_samples: int, num_features: int) -> NystromBasis:
        """All ``N·d`` pairs: the un-projected estimator."""
        flat = np.arange(num_samples * num_features)
        return cls(flat // num_features, flat % num_features)

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, NystromBasis)
            and np.array_equal(self.indices, other.indices)
            and np.array_equal(self.dims, other.dims)
        )

    def __repr__(self) -> str:
        return f"NystromBasis(M={self.num_basis})"


def nystrom_basis(samples, num_basis: int | None, *, rng=None, exact: bool = False) -> NystromBasis:
    """Draw a Nyström basis for ``samples`` of shape ``(N, d)``.

    With ``M = num_basis <= N``: ``M`` points uniformly without replacement, each with a
    coordinate drawn uniformly. With ``N < M <= N·d``: ``M`` distinct (point, coordinate)
    pairs uniformly. ``M = N·d`` or ``exact=True``: every pair (the un-projected estimator).

    Parameters
    ----------
    samples : array of shape (N, d), or a tuple ``(N, d)``
        Only the shape is read; the arrays stay where they are.
    num_basis : int or None
        ``M``, ``1 <= M <= N·d``; ignored (may be ``None``) when ``exact``.
    rng : int, numpy.random.Generator or None
        Seed or generator (NumPy's, on the host: identical draws on every backend).
    exact : bool
        Return :meth:`NystromBasis.exact`.

    Returns
    -------
    NystromBasis

    Examples
    --------
    >>> b = nystrom_basis((100, 3), 5, rng=0)
    >>> b.num_basis, bool(b.indices.max() < 100), bool(b.dims.max() < 3)
    (5, True, True)
    """
    shape = tuple(samples) if isinstance(samples, tuple) else tuple(samples.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"samples must be 2-D (N, d) and non-empty; got shape {shape}")
    n, d = int(shape[0]), int(shape[1])
    if exact:
        return NystromBasis.exact(n, d)
    num_basis = _backend.check_int(num_basis, "num_basis")
    if not 1 <= num_basis <= n * d:
        raise ValueError(f"num_basis must be in [1, N·d = {n * d}]; got {num_basis}")
    gen = np.random.default_rng(rng)
    if num_basis == n * d:
        return NystromBasis.exact(n, d)
    if num_basis <= n:
        return NystromBasis(gen.choice(n, size=num_basis, replace=False), gen.integers(0, d, num_basis))
    flat = gen.choice(n * d, size=num_basis, replace=False)
    return NystromBasis(flat // d, flat % d)

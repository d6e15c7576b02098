r"""Closed-form models: samplers, ``h_θ``, Jacobians, exact ``G_W`` and natural gradients.

For these location–scale models the velocity field :math:`x \mapsto \nabla_\theta h_\theta(z) u`
is a gradient field, so :math:`G_W(\theta) = \mathbb{E}[\nabla_\theta h_\theta(Z)^\top
\nabla_\theta h_\theta(Z)]` (the mathematics page, "The Wasserstein information matrix"):

- :class:`GaussianModel`: ``X = a + r Z``, ``Z ~ N(0, I_d)``, ``θ = (a, r)``: ``G_W = diag(I_d, d)``;
- :class:`HypersphereModel`: ``X = a + r Z``, ``Z`` uniform on ``S^{d-1}``: ``G_W = I_{d+1}``;
- :class:`DiagonalGaussianModel`: ``X = μ + σ ⊙ Z``, ``θ = (μ, σ)``: ``G_W = I_{2d}``.

Latent samples are drawn with NumPy on the host (seeded); ``h``, ``jacobian``, ``metric``
and ``natural_gradient`` work on arrays of any array-API library and return the same kind.
"""

from __future__ import annotations

import numpy as np

from . import _backend

__all__ = [
    "DiagonalGaussianModel",
    "GaussianModel",
    "HypersphereModel",
    "w2_diagonal_gaussians",
    "w2_diagonal_gaussians_grad",
]


class _LocationScale:
    """``X = a + r Z`` with a scalar scale ``r``; ``θ = (a_1..a_d, r)``, ``q = d + 1``."""

    def __init__(self, d: int):
        self.d = _backend.check_int(d, "d", minimum=1)

    @property
    def num_params(self) -> int:
        """``q = d + 1``."""
        return self.d + 1

    def default_theta(self, like=None):
        """``θ = (0, …, 0, 1)``, in ``like``'s namespace (NumPy by default)."""
        theta = np.zeros(self.num_params)
        theta[-1] = 1.0
        return _like(theta, like)

    def _check(self, theta, z):
        xp = _backend.namespace(theta, z, names=("theta", "z"))
        if theta.ndim != 1 or theta.shape[0] != self.num_params:
            raise ValueError(f"theta must have shape ({self.num_params},); got {tuple(theta.shape)}")
        z = _backend.as_float_matrix(xp, z, "z", _backend.result_float_dtype(xp, theta, z))
        if z.shape[1] != self.d:
            raise ValueError(f"z must have shape (N, {self.d}); got {tuple(z.shape)}")
        return xp, xp.astype(theta, z.dtype), z

    def h(self, theta, z):
        """Samples ``X = a + r Z``: ``(N, d)`` from ``theta`` ``(d+1,)`` and ``z`` ``(N, d)``."""
        xp, theta, z = self._check(theta, z)
        return theta[None, : self.d] + theta[self.d] * z

    def jacobian(self, theta, z):
        """``J[n, i, :] = ∇_θ X_{n,i} = (e_i, Z_{n,i})``: shape ``(N, d, d+1)``."""
        xp, theta, z = self._check(theta, z)
        eye = xp.eye(self.d, dtype=z.dtype, device=_backend.device(z))
        eye = xp.broadcast_to(eye[None, :, :], (z.shape[0], self.d, self.d))
        return xp.concat([eye, z[:, :, None]], axis=2)

    def _scale_metric(self) -> float:
        raise NotImplementedError

    def metric(self, theta):
        """Exact ``G_W(θ)``, ``(d+1, d+1)``: ``diag(I_d, E‖Z‖²)``."""
        xp = _backend.namespace(theta, names=("theta",))
        diag = xp.ones(self.num_params, dtype=theta.dtype, device=_backend.device(theta))
        diag = xp.concat([diag[: self.d], diag[self.d :] * self._scale_metric()])
        return xp.eye(self.num_params, dtype=theta.dtype, device=_backend.device(theta)) * diag[None, :]

    def natural_gradient(self, theta, grad):
        """Exact ``G_W(θ)⁻¹ g`` for ``grad`` ``(d+1,)``."""
        xp = _backend.namespace(theta, grad, names=("theta", "grad"))
        if grad.ndim != 1 or grad.shape[0] != self.num_params:
            raise ValueError(f"grad must have shape ({self.num_params},); got {tuple(grad.shape)}")
        return xp.concat([grad[: self.d], grad[self.d :] / self._scale_metric()])


def _like(a: np.ndarray, like):
    if like is None:
        return a
    xp = _backend.namespace(like, names=("like",))
    return xp.asarray(a, dtype=like.dtype if xp.isdtype(like.dtype, "real floating") else None,
                      device=_backend.device(like))


class GaussianModel(_LocationScale):
    """The seed's Gaussians: ``X = a + r Z``, ``Z ~ N(0, I_d)``; ``G_W = diag(I_d, d)``.

    Parameters
    ----------
    d : int
        Dimension of ``X``.
    """

    def sample_latent(self, n: int, rng=None, like=None):
        """``n`` draws of ``Z ~ N(0, I_d)``, ``(n, d)``, NumPy or ``like``'s namespace."""
        n = _backend.check_int(n, "n", minimum=1)
        return _like(np.random.default_rng(rng).standard_normal((n, self.d)), like)

    def _scale_metric(self) -> float:
        return float(self.d)


class HypersphereModel(_LocationScale):
    """The seed's hyperspheres: ``X = a + r Z``, ``Z`` uniform on ``S^{d-1}``; ``G_W = I_{d+1}``.

    The law of ``X`` has no density in ``R^d``: the Fisher natural gradient is undefined,
    the Wasserstein one is not.

    Parameters
    ----------
    d : int
        Dimension of ``X`` (``d >= 2`` for a sphere with more than two points).
    """

    def sample_latent(self, n: int, rng=None, like=None):
        """``n`` points uniform on the unit sphere, ``(n, d)``."""
        z = np.random.default_rng(rng).standard_normal((_backend.check_int(n, "n", minimum=1), self.d))
        return _like(z / np.linalg.norm(z, axis=1, keepdims=True), like)

    def _scale_metric(self) -> float:
        return 1.0


class DiagonalGaussianModel:
    """``X = μ + σ ⊙ Z``, ``Z ~ N(0, I_d)``, ``θ = (μ, σ)`` ``(2d,)``; ``G_W = I_{2d}``.

    Parameters
    ----------
    d : int
        Dimension of ``X``.
    """

    def __init__(self, d: int):
        self.d = _backend.check_int(d, "d", minimum=1)

    @property
    def num_params(self) -> int:
        """``q = 2d``."""
        return 2 * self.d

    def default_theta(self, like=None):
        """``θ = (0, 1)``: the standard normal."""
        return _like(np.concatenate([np.zeros(self.d), np.ones(self.d)]), like)

    def sample_latent(self, n: int, rng=None, like=None):
        """``n`` draws of ``Z ~ N(0, I_d)``."""
        n = _backend.check_int(n, "n", minimum=1)
        return _like(np.random.default_rng(rng).standard_normal((n, self.d)), like)

    _check = _LocationScale._check

    def h(self, theta, z):
        """``X = μ + σ ⊙ Z``, ``(N, d)``."""
        xp, theta, z = self._check(theta, z)
        return theta[None, : self.d] + theta[None, self.d :] * z

    def jacobian(self, theta, z):
        """``J[n, i, :] = (e_i, Z_{n,i} e_i)``: shape ``(N, d, 2d)``."""
        xp, theta, z = self._check(theta, z)
        eye = xp.eye(self.d, dtype=z.dtype, device=_backend.device(z))
        return xp.concat(
            [xp.broadcast_to(eye[None, :, :], (z.shape[0], self.d, self.d)), z[:, :, None] * eye[None, :, :]],
            axis=2,
        )

    def metric(self, theta):
        """Exact ``G_W = I_{2d}``."""
        xp = _backend.namespace(theta, names=("theta",))
        return xp.eye(self.num_params, dtype=theta.dtype, device=_backend.device(theta))

    def natural_gradient(self, theta, grad):
        """Exact ``G_W⁻¹ g = g``."""
        _backend.namespace(theta, grad, names=("theta", "grad"))
        if grad.ndim != 1 or grad.shape[0] != self.num_params:
            raise ValueError(f"grad must have shape ({self.num_params},); got {tuple(grad.shape)}")
        return grad


def w2_diagonal_gaussians(theta, theta_target):
    """``W₂²(N(μ₁, diag σ₁²), N(μ₂, diag σ₂²)) = ‖μ₁ − μ₂‖² + ‖σ₁ − σ₂‖²`` for ``θ = (μ, σ)``, ``σ ≥ 0``.

    Parameters
    ----------
    theta, theta_target : array, shape (2d,)

    Returns
    -------
    array, shape ()
    """
    xp = _backend.namespace(theta, theta_target, names=("theta", "theta_target"))
    if theta.shape != theta_target.shape or theta.ndim != 1 or theta.shape[0] % 2:
        raise ValueError(
            f"theta and theta_target must both have shape (2d,); got {tuple(theta.shape)} and "
            f"{tuple(theta_target.shape)}"
        )
    return xp.sum((theta - theta_target) ** 2)


def w2_diagonal_gaussians_grad(theta, theta_target):
    """Gradient of :func:`w2_diagonal_gaussians` in ``theta``: ``2 (θ − θ*)``, shape ``(2d,)``."""
    w2_diagonal_gaussians(theta, theta_target)  # validation
    return 2 * (theta - theta_target)

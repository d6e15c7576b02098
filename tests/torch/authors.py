"""The paper's estimator as the authors' 2019 code computes it, re-derived densely in float64.

An independent truth for the parity tests: nothing here calls wngkernels. The formulas are
those of the mathematics page (ridgeless, ``λ = 0``), with the authors' choices:

- bandwidth ``ℓ² = mean_{m,n} ‖Y_m − X_n‖²`` (their ``log_bandwidth = 0``);
- ``C`` ``(M, N d)`` from the Gaussian cross-derivatives, ``T = C J / √N`` from the dense
  Jacobian ``J`` ``(N d, q)``;
- ``C Cᵀ = U S Uᵀ`` (eigenvalues ``<= 0`` cut), ``T̃ = S^{-1/2} Uᵀ T``;
- ``D_jj = 1 / (‖T̃_{:, j}‖ + 1e-8)``;
- ``w = D (g − T̃ᵀ (T̃ D T̃ᵀ + ε P)⁻¹ T̃ D g) / ε`` with ``P`` the kept eigen-directions.

Also the seed's ill-conditioned networks: logits multiplied by ``logspace(-6, 1, classes)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

GUARD = 1e-8


def gaussian_cross_rows(points, dims, x, ell2):
    """``H[m, n, i] = ∂_{x_{i_m}} ∂_{y_i} k(Y_m, X_n)`` for ``k = exp(-‖x − y‖² / (2ℓ²))``."""
    diff = points[:, None, :] - x[None, :, :]  # (M, N, d)
    k = np.exp(-0.5 * np.sum(diff**2, axis=2) / ell2)  # (M, N)
    sel = diff[np.arange(len(dims)), :, dims]  # (M, N): (Y_m − X_n)_{i_m}
    onehot = np.eye(x.shape[1])[dims]  # (M, d)
    return k[:, :, None] * (onehot[:, None, :] / ell2 - sel[:, :, None] * diff / ell2**2)


def whitened(samples, jacobian, indices, dims):
    """``T̃`` ``(M, q)`` and the mask ``P`` of kept eigen-directions, in float64."""
    x = np.asarray(samples, dtype=np.float64)
    n, d = x.shape
    points = x[indices]
    ell2 = np.mean(np.sum((points[:, None, :] - x[None, :, :]) ** 2, axis=2))
    c = gaussian_cross_rows(points, np.asarray(dims), x, ell2).reshape(len(dims), n * d) / np.sqrt(n)
    t = c @ (np.asarray(jacobian, dtype=np.float64).reshape(n * d, -1) / np.sqrt(n))
    s, u = np.linalg.eigh(c @ c.T)
    keep = s > 0
    inv_sqrt = np.where(keep, 1.0 / np.sqrt(np.where(keep, s, 1.0)), 0.0)
    return inv_sqrt[:, None] * (u.T @ t), keep


def direction(grad, samples, jacobian, indices, dims, eps, guard=GUARD):
    """The authors' KWNG direction ``(q,)`` with ``D = diag(Ĝ)^{-1/2}`` guarded by ``guard``."""
    g = np.asarray(grad, dtype=np.float64)
    tw, keep = whitened(samples, jacobian, indices, dims)
    dd = 1.0 / (np.sqrt(np.sum(tw * tw, axis=0)) + guard)
    lhs = (tw * dd[None, :]) @ tw.T + eps * np.diag(keep.astype(np.float64))
    inner = np.linalg.solve(lhs, tw @ (dd * g))
    return dd * (g - tw.T @ inner) / eps


class IllConditionedNet(nn.Module):
    """A small conv net with BatchNorm (no bias before it, as in the seed's ResNet), logits × ``scale``."""

    def __init__(self, classes: int = 10, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.fc = nn.Linear(2 * width, classes)
        self.register_buffer("scale", torch.logspace(-6, 1, classes))

    def forward(self, x):
        z = self.features(x).mean(dim=(2, 3))
        return self.fc(z) * self.scale


def digits_batches(batch: int, count: int, seed: int = 0, dtype=torch.float32):
    """``count`` batches of scikit-learn's 8×8 digits ``(batch, 1, 8, 8)``, standardised, with labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x - x.mean()) / x.std()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        idx = rng.choice(len(x), size=batch, replace=False)
        out.append((torch.as_tensor(x[idx], dtype=dtype).reshape(batch, 1, 8, 8), torch.as_tensor(y[idx])))
    return out

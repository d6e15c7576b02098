"""A dense float64 KWNG written straight from DESIGN §2 — the tests' independent truth.

It forms ``C`` (``M × Nd``) from the full ``d × d`` cross-Hessian blocks, ``T = C B`` with
``B = J / √N``, ``Ĝ = Tᵀ (CCᵀ + λK)^† T`` and solves ``(Ĝ + ε D⁻¹) w = g`` directly.
Only for small problems.
"""

import numpy as np


def dense_parts(samples, jacobian, kernel, basis):
    x = np.asarray(samples, dtype=np.float64)
    n, d = x.shape
    y = x[basis.indices]
    kernel = kernel.resolve(y, x)
    m = basis.num_basis
    full = kernel.cross_hessian(y, x)  # (M, N, d, d)
    c = full[np.arange(m), :, basis.dims, :].reshape(m, n * d) / np.sqrt(n)
    kyy = kernel.cross_hessian(y, y)[np.arange(m)[:, None], np.arange(m)[None, :],
                                     basis.dims[:, None], basis.dims[None, :]]
    t = None if jacobian is None else c @ (np.asarray(jacobian).reshape(n * d, -1) / np.sqrt(n))
    return c, kyy, t


def dense_metric(samples, jacobian, kernel, basis, lam=0.0, rcond=None):
    c, kyy, t = dense_parts(samples, jacobian, kernel, basis)
    a = c @ c.T + lam * kyy
    rcond = basis.num_basis * np.finfo(np.float64).eps if rcond is None else rcond
    return t.T @ np.linalg.pinv(a, rcond=rcond, hermitian=True) @ t


def dense_direction(grad, samples, jacobian, kernel, basis, eps, lam=0.0, damping="identity"):
    g_hat = dense_metric(samples, jacobian, kernel, basis, lam)
    q = g_hat.shape[0]
    if isinstance(damping, str) and damping == "identity":
        d_inv = np.ones(q)
    elif isinstance(damping, str) and damping == "jacobian":
        d_inv = np.sqrt(np.diag(g_hat)) + 1e-8  # D = 1/(diag(Ĝ)^{1/2} + floor), the authors' guard
    else:
        d_inv = 1.0 / np.asarray(damping)
    return np.linalg.solve(g_hat + eps * np.diag(d_inv), np.asarray(grad, dtype=np.float64))


def naive_dual_direction(grad, t_white, eps):
    """The Woodbury form of DESIGN §2 as written: ε⁻¹(g − T̃ᵀ (T̃T̃ᵀ + εI)⁻¹ T̃ g) (D = I)."""
    m = t_white.shape[0]
    inner = np.linalg.solve(t_white @ t_white.T + eps * np.eye(m), t_white @ grad)
    return (grad - t_white.T @ inner) / eps

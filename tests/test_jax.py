"""JAX specifics: float64 agreement with NumPy to 1e-10, and what ``jax.jit`` can trace.

The backend matrix of ``conftest.py`` runs the core tests on JAX (CPU) like on every other
library; ``conftest.py`` also turns on ``jax_enable_x64``. This file adds what the matrix does
not check: a tolerance tighter than the matrix's ``4·sqrt(eps)``, and tracing under ``jax.jit``.

**jit.** The core validates on the host: a finiteness check, a bandwidth rule, a range check
reads one scalar back (``bool``/``float`` of a 0-d array). A traced array has no value to read,
so every entry point that validates its array inputs fails under ``jax.jit`` with JAX's
``ConcretizationTypeError`` (a ``TypeError``), raised at the first read
(:func:`wngkernels._backend.require_finite` for the kernels and the estimator). The one
per-step call that reads nothing back, :meth:`~wngkernels.solve.WhitenedSolver.solve` with
``check_finite=False`` on a solver factorised outside, traces and compiles.
"""

import numpy as np
import pytest

import wngkernels as wk
from wngkernels import AuthorsRule, Gaussian, MedianHeuristic, RationalQuadratic

jax = pytest.importorskip("jax")
jnp = jax.numpy

RTOL = 1e-10

KERNELS = {
    "gauss": Gaussian(0.8),
    "rq": RationalQuadratic(1.1, alpha=1.3),
    "gauss-authors": Gaussian(AuthorsRule()),
    "rq-median": RationalQuadratic(MedianHeuristic(), alpha=0.7),
}


def _close(actual, desired):
    """JAX float64 on the CPU, and NumPy's values to ``RTOL`` (relative to the largest entry)."""
    assert isinstance(actual, jax.Array), type(actual)
    assert actual.dtype == jnp.float64
    assert actual.devices() == {jax.devices("cpu")[0]}
    desired = np.asarray(desired)
    assert actual.shape == desired.shape
    np.testing.assert_allclose(np.asarray(actual), desired, rtol=RTOL,
                               atol=RTOL * float(np.max(np.abs(desired), initial=0.0)))


def _problem(n=12, d=3, q=5, m=7, seed=0):
    rng = np.random.default_rng(seed)
    x, jac, g = rng.normal(size=(n, d)), rng.normal(size=(n, d, q)), rng.normal(size=q)
    return x, jac, g, wk.nystrom_basis(x, m, rng=seed)


def test_x64_is_enabled():
    assert jnp.asarray(1.0, dtype=jnp.float64).dtype == jnp.float64


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_methods_match_numpy_to_1e_10(name):
    k = KERNELS[name]
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    dx, dy = [0, 2, 1, 1, 0], [2, 2, 0, 1]
    jx, jy = jnp.asarray(x), jnp.asarray(y)
    _close(k(jx, jy), k(x, y))
    _close(k.grad_x(jx, jy), k.grad_x(x, y))
    _close(k.cross_hessian(jx, jy), k.cross_hessian(x, y))
    _close(k.cross_hessian_rows(jx, dx, jy), k.cross_hessian_rows(x, dx, y))
    _close(k.cross_hessian_rows(jx, jnp.asarray(dx), jy), k.cross_hessian_rows(x, dx, y))
    _close(k.cross_hessian_selected(jx, dx, jy, dy), k.cross_hessian_selected(x, dx, y, dy))
    if callable(k.bandwidth):
        assert k.bandwidth(jx, jy) == pytest.approx(k.bandwidth(x, y), rel=RTOL)


@pytest.mark.parametrize("name", ["gauss", "rq-median"])
def test_estimator_matches_numpy_to_1e_10(name):
    k = KERNELS[name]
    x, jac, g, basis = _problem()
    jx, jjac, jg = jnp.asarray(x), jnp.asarray(jac), jnp.asarray(g)
    kw = {"kernel": k, "basis": basis}
    _close(wk.cotangents(jx, **kw), wk.cotangents(x, **kw))
    _close(wk.cc_gram(jx, **kw, chunk_size=5), wk.cc_gram(x, **kw, chunk_size=5))
    _close(wk.k_gram(jx, **kw), wk.k_gram(x, **kw))
    _close(wk.t_matrix(jx, **kw, jacobian=jjac), wk.t_matrix(x, **kw, jacobian=jac))
    _close(wk.metric_apply(jg, jx, **kw, jacobian=jjac, lam=0.1),
           wk.metric_apply(g, x, **kw, jacobian=jac, lam=0.1))
    for damping in ("identity", "jacobian"):
        _close(wk.kwng_direction(jg, jx, **kw, eps=0.1, jacobian=jjac, damping=damping),
               wk.kwng_direction(g, x, **kw, eps=0.1, jacobian=jac, damping=damping))


@pytest.mark.parametrize("form", ["primal", "dual", "dual-qr"])
def test_solve_matches_numpy_to_1e_10(form):
    rng = np.random.default_rng(2)
    cc = rng.normal(size=(4, 6))
    cc = cc @ cc.T
    t, g, damping = rng.normal(size=(4, 6)), rng.normal(size=6), rng.uniform(0.5, 2.0, size=6)
    tw, jtw = wk.whiten(cc, t), wk.whiten(jnp.asarray(cc), jnp.asarray(t))
    _close(jtw.T @ jtw, tw.T @ tw)  # Ĝ = T̃ᵀT̃: free of the eigenvectors' signs
    _close(wk.damping_from_whitened(jtw), wk.damping_from_whitened(tw))
    _close(wk.solve_whitened(jtw, jnp.asarray(g), eps=0.1, damping=jnp.asarray(damping), form=form),
           wk.solve_whitened(tw, g, eps=0.1, damping=damping, form=form))


# -- jax.jit ------------------------------------------------------------------------------------


def test_jit_of_the_factorised_solve_matches_eager():
    """``WhitenedSolver.solve(..., check_finite=False)`` reads nothing back: it traces."""
    rng = np.random.default_rng(3)
    t_white = jnp.asarray(rng.normal(size=(3, 5)))
    for damping in (None, jnp.asarray([1.0, 0.5, 0.0, 2.0, 1.0])):  # 0: an excluded parameter
        solver = wk.factorize_whitened(t_white, damping=damping)
        step = jax.jit(lambda g, s=solver: s.solve(g, 0.1, check_finite=False))
        for seed in (4, 5):
            g = jnp.asarray(np.random.default_rng(seed).normal(size=5))
            np.testing.assert_allclose(np.asarray(step(g)), np.asarray(solver.solve(g, 0.1)), rtol=RTOL)


_SOLVER = wk.factorize_whitened(jnp.asarray(np.eye(3, 2)))


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda x: Gaussian(1.0).cross_hessian(x, x), id="cross_hessian"),
        pytest.param(lambda x: Gaussian(1.0)(x, x), id="kernel-matrix"),
        pytest.param(lambda x: wk.cc_gram(x, kernel=Gaussian(1.0), basis=wk.NystromBasis.exact(4, 2)),
                     id="cc_gram"),
        pytest.param(lambda x: wk.factorize_whitened(x, damping=jnp.ones(2)), id="factorize_whitened"),
        pytest.param(lambda x: _SOLVER.solve(x[0, :], 0.1), id="solve-with-check_finite"),
    ],
)
def test_jit_of_validating_calls_fails_at_the_host_read(call):
    """Host-side validation (finiteness, ranges, bandwidth rules) reads scalars back, which a
    traced array cannot give: JAX refuses with ``ConcretizationTypeError`` (a ``TypeError``).
    The same call works eagerly."""
    x = jnp.asarray(np.random.default_rng(6).normal(size=(4, 2)))
    call(x)  # eager: fine
    with pytest.raises(jax.errors.ConcretizationTypeError):
        jax.jit(call)(x)

"""The Jacobian-norm damping and the rule for parameters the outputs do not see (``wngkernels.solve``)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import wngkernels as wk
from wngkernels import solve
from wngkernels.solve import DAMPING_FLOOR, UNSEEN_SHARE


def _graded(m=5, q=12, unseen=(3, 7), seed=0, span=14):
    """``T̃`` whose column norms span 1 to ``10^-span`` (an ill-conditioned network's pattern), some zero."""
    rng = np.random.default_rng(seed)
    t_white = rng.normal(size=(m, q)) * np.logspace(0, -span, q)[None, :]
    t_white[:, list(unseen)] = 0.0
    return t_white, rng.normal(size=q)


def test_damping_is_the_authors_absolute_guard_and_zero_on_unseen_columns(backend):
    t_white, _ = _graded()
    d = wk.damping_from_whitened(backend.asarray(t_white))
    norms = np.linalg.norm(t_white, axis=0)
    want = np.where(norms > 0, 1.0 / (norms + DAMPING_FLOOR), 0.0)
    backend.assert_close(d, want)
    # the guard is absolute: columns far below it all get the same gain 1/floor
    tiny = norms < 1e-3 * DAMPING_FLOOR
    assert tiny.sum() >= 3
    np.testing.assert_allclose(backend.to_numpy(d)[tiny & (norms > 0)], 1 / DAMPING_FLOOR, rtol=1e-3)
    backend.assert_close(wk.damping_from_whitened(backend.asarray(t_white), floor=0.5),
                         np.where(norms > 0, 1.0 / (norms + 0.5), 0.0))


@pytest.mark.parametrize("floor", [0.0, -1.0, float("nan"), "1e-8"])
def test_damping_floor_must_be_positive(floor):
    with pytest.raises((ValueError, TypeError), match="floor must be"):
        wk.damping_from_whitened(np.ones((2, 3)), floor=floor)


def _reference_unseen(t_white, g, eps, d):
    """Dense float64: the solve over the seen columns, then ``w_U = ρ g_U`` capped at half the norm."""
    seen = d > 0
    ts = t_white[:, seen]
    w = np.zeros_like(g)
    w[seen] = np.linalg.solve(ts.T @ ts + eps * np.diag(1.0 / d[seen]), g[seen])
    ws, gs, gu = np.linalg.norm(w[seen]), np.linalg.norm(g[seen]), np.linalg.norm(g[~seen])
    rho = ws / gs if gs > 0 else 1.0
    if gs > 0 and rho * gu > ws * UNSEEN_SHARE / np.sqrt(1 - UNSEEN_SHARE**2):
        rho = ws * UNSEEN_SHARE / np.sqrt(1 - UNSEEN_SHARE**2) / gu
    w[~seen] = rho * g[~seen]
    return w


@pytest.mark.parametrize("form", ["primal", "dual", "dual-qr"])
def test_unseen_parameters_take_the_seen_gain_and_leave_the_rest_unchanged(form, backend):
    # float32 cannot resolve columns graded over 14 orders in the primal q × q eigen-decomposition
    t_white, g = _graded(q=12) if backend.is_float64 else _graded(q=12, span=3)
    d = np.where(np.linalg.norm(t_white, axis=0) > 0, 1.0 / (np.linalg.norm(t_white, axis=0) + 1.0), 0.0)
    want = _reference_unseen(t_white, g, 1e-2, d)
    w = wk.solve_whitened(backend.asarray(t_white), backend.asarray(g), eps=1e-2,
                          damping=backend.asarray(d), form=form)
    backend.assert_close(w, want, rtol=1e-9 if backend.is_float64 else 2e-3,
                         atol=0 if backend.is_float64 else 1e-4 * np.abs(want).max())


@given(gain=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_unseen_share_never_exceeds_one_half_and_moves_downhill(gain, seed):
    rng = np.random.default_rng(seed)
    t_white, g = _graded(seed=seed)
    g[[3, 7]] *= gain  # the unseen gradient from negligible to dominant
    d = wk.damping_from_whitened(t_white)
    w = wk.solve_whitened(t_white, g, eps=10.0 ** rng.uniform(-8, 0), damping=d)
    unseen = d == 0
    share = np.linalg.norm(w[unseen]) / np.linalg.norm(w)
    assert 0 < share <= UNSEEN_SHARE * (1 + 1e-9)
    assert np.dot(w[unseen], g[unseen]) > 0
    np.testing.assert_allclose(w[unseen] / g[unseen], (w[unseen] / g[unseen])[0], rtol=1e-9)  # ∝ g_U


def test_with_no_seen_gradient_the_unseen_take_the_gradient():
    t_white, g = _graded()
    d = wk.damping_from_whitened(t_white)
    g = np.where(d == 0, g, 0.0)
    np.testing.assert_array_equal(wk.solve_whitened(t_white, g, eps=1e-3, damping=d), g)


def test_kwng_direction_with_jacobian_damping_uses_the_floor_and_the_rule():
    """Through the public estimator: a parameter with a zero Jacobian column (the outputs ignore it)."""
    rng = np.random.default_rng(3)
    x, jac, g = rng.normal(size=(40, 3)), rng.normal(size=(40, 3, 6)), rng.normal(size=6)
    jac[:, :, 4] = 0.0
    basis = wk.nystrom_basis(x, 8, rng=0)
    kernel = wk.Gaussian(wk.AuthorsRule())
    w = wk.kwng_direction(g, x, kernel=kernel, basis=basis, eps=1e-4, damping="jacobian", jacobian=jac)
    t_white = wk.whiten(wk.cc_gram(x, kernel=kernel, basis=basis), wk.t_matrix(x, kernel=kernel, basis=basis,
                                                                               jacobian=jac))
    norms = np.linalg.norm(t_white, axis=0)
    assert norms[4] == 0 and norms.min(initial=np.inf, where=norms > 0) > 0
    d = np.where(norms > 0, 1.0 / (norms + DAMPING_FLOOR), 0.0)
    np.testing.assert_allclose(w, _reference_unseen(t_white, g, 1e-4, d), rtol=1e-8)
    w_floor = wk.kwng_direction(g, x, kernel=kernel, basis=basis, eps=1e-4, damping="jacobian", jacobian=jac,
                                damping_floor=0.3)
    d = np.where(norms > 0, 1.0 / (norms + 0.3), 0.0)
    np.testing.assert_allclose(w_floor, _reference_unseen(t_white, g, 1e-4, d), rtol=1e-8)


@pytest.mark.parametrize("block", [None, 2], ids=["plain", "blocked"])
@pytest.mark.parametrize(("form", "m", "q"), [("primal", 4, 3), ("dual", 3, 9), ("dual-qr", 3, 9)])
def test_solver_holds_the_eigendecomposition_of_s_transpose_s(backend, form, m, q, block, monkeypatch):
    """``SᵀS = τ² V diag(μ) Vᵀ`` with orthonormal ``V`` (the dual form keeps ``V = QU`` unformed and
    forms it on request), against the float64 dense ``SᵀS``; and the solve is the dense solve.
    ``blocked``: the long axis cut into blocks of 2 (4 blocks and a tail), as a long ``q`` is."""
    if block:
        monkeypatch.setattr(solve, "_GRAM_BLOCK", block)
    rng = np.random.default_rng(3)
    t_white, dmp = rng.normal(size=(m, q)) * 40.0, rng.uniform(0.5, 2.0, size=q)
    solver = wk.factorize_whitened(backend.asarray(t_white), damping=backend.asarray(dmp), form=form)
    v, mu = backend.to_numpy(solver.vectors), backend.to_numpy(solver.values)
    s = t_white * np.sqrt(dmp)[None, :]
    k = q if form == "primal" else m
    assert v.shape == (q, k) and mu.shape == (k,)
    tol = 1e-12 if backend.is_float64 else 1e-5
    np.testing.assert_allclose(v.T @ v, np.eye(k), atol=tol)
    gram = s.T @ s
    tau = float(backend.to_numpy(solver.scale))
    np.testing.assert_allclose(tau**2 * (v * mu) @ v.T, gram, atol=tol * np.abs(gram).max())
    g, eps = rng.normal(size=q), 0.3
    dense = np.sqrt(dmp) * np.linalg.solve(gram + eps * np.eye(q), np.sqrt(dmp) * g)
    # the system's condition number (~1e4) times the dtype's precision, relative to the largest entry
    solve_tol = 1e-9 if backend.is_float64 else 1e-2
    backend.assert_close(solver.solve(backend.asarray(g), eps), dense, rtol=0,
                         atol=solve_tol * np.abs(dense).max())


@pytest.mark.parametrize(("m", "p", "q", "block"),
                         [(5, 5, 3 * 16 + 5, 16), (3, 1, 64, 16), (4, 2, 8292, None)])
def test_blocked_gram_is_the_product(backend, m, p, q, block, monkeypatch):
    """``_gram(a, b) = a bᵀ`` against float64, with and without a tail of the long axis, for a
    row-major ``a`` and a transposed view (the blocks are then copies), at the real block length too."""
    if block:
        monkeypatch.setattr(solve, "_GRAM_BLOCK", block)
    rng = np.random.default_rng(q)
    a, b = rng.normal(size=(m, q)) * np.logspace(0, -3, q), rng.normal(size=(p, q))
    xp = backend.xp
    want = a @ b.T
    tol = 1e-12 if backend.is_float64 else 1e-5
    got = solve._gram(xp, backend.asarray(a), backend.asarray(b))
    backend.assert_close(got, want, rtol=0, atol=tol * np.abs(want).max())
    a_view = xp.permute_dims(backend.asarray(a.T), (1, 0))  # (m, q), column-major
    backend.assert_close(solve._gram(xp, a_view), a @ a.T, rtol=0, atol=tol * np.abs(a @ a.T).max())


@pytest.mark.parametrize("scale", ["moderate", "huge", "tiny", "zero column", "mixed"])
def test_column_norms_neither_overflow_nor_underflow(backend, scale):
    """``_column_norms`` against float64 norms: the plain sum of squares where it is exact, a
    per-column scale where squares would overflow (1e30 in float32) or be lost (1e-30), and an
    exactly zero column read as zero, never as a column of lost squares."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(4, 40))
    big = 1e30 if not backend.is_float64 else 1e300
    small = 1e-30 if not backend.is_float64 else 1e-300
    if scale == "huge":
        a[:, 3] *= big
    elif scale == "tiny":
        a[:, 3] *= small
    elif scale == "zero column":
        a[:, 3] = 0.0
    elif scale == "mixed":
        a[:, 3] *= big
        a[:, 5] *= small
        a[:, 7] = 0.0
    want = np.array([np.linalg.norm(a[:, j] / np.abs(a[:, j]).max()) * np.abs(a[:, j]).max()
                     if np.any(a[:, j]) else 0.0 for j in range(a.shape[1])])
    got = backend.to_numpy(solve._column_norms(backend.xp, backend.asarray(a)))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-12 if backend.is_float64 else 2e-6)
    assert (got == 0).sum() == (want == 0).sum()

"""The KWNG estimator against a dense float64 implementation, closed forms, and bad input."""

import numpy as np
import pytest

import wngkernels as wk
from wngkernels import AuthorsRule, Gaussian, NystromBasis, RationalQuadratic, nystrom_basis
from wngkernels.models import GaussianModel, HypersphereModel

from .reference import dense_direction, dense_metric, dense_parts


def linear_problem(n=40, d=3, q=5, m=12, seed=0):
    """Random samples, a random Jacobian (N, d, q), a gradient and a basis."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    jac = rng.normal(size=(n, d, q))
    g = rng.normal(size=q)
    return x, jac, g, nystrom_basis(x, m, rng=seed)


KERNELS = [Gaussian(AuthorsRule()), RationalQuadratic(1.5, alpha=0.8)]


@pytest.mark.parametrize("kernel", KERNELS, ids=["gauss-rule", "rq"])
@pytest.mark.parametrize("lam", [0.0, 0.1])
@pytest.mark.parametrize("damping", ["identity", "jacobian", "array"])
@pytest.mark.parametrize(
    ("q", "form"),
    [(5, "primal"), (5, "dual"), (5, "dual-qr"), (30, "dual"), (30, "dual-qr"), (30, "primal"), (30, "auto")],
)
def test_direction_matches_dense_reference(kernel, lam, damping, q, form):
    x, jac, g, basis = linear_problem(q=q)
    dmp = np.linspace(0.5, 2.0, q) if damping == "array" else damping
    want = dense_direction(g, x, jac, kernel, basis, eps=1e-2, lam=lam, damping=dmp)
    got = wk.kwng_direction(g, x, kernel=kernel, basis=basis, eps=1e-2, lam=lam, damping=dmp,
                            jacobian=jac, form=form)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9 * np.abs(want).max())


@pytest.mark.parametrize("chunk_size", [1, 7, 40, None])
def test_chunked_cc_equals_dense(chunk_size):
    x, jac, _, basis = linear_problem()
    c, _, t = dense_parts(x, jac, Gaussian(0.9), basis)
    np.testing.assert_allclose(wk.cc_gram(x, kernel=Gaussian(0.9), basis=basis, chunk_size=chunk_size),
                               c @ c.T, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(wk.t_matrix(x, kernel=Gaussian(0.9), basis=basis, jacobian=jac,
                                           chunk_size=chunk_size), t, rtol=1e-12, atol=1e-14)


def test_cotangents_k_and_vjp_agree_with_dense():
    x, jac, _, basis = linear_problem()
    k = RationalQuadratic(1.2, alpha=2.0)
    c, kyy, t = dense_parts(x, jac, k, basis)
    n, d = x.shape
    a = wk.cotangents(x, kernel=k, basis=basis)
    np.testing.assert_allclose(a.reshape(basis.num_basis, n * d), c / np.sqrt(n), rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(wk.k_gram(x, kernel=k, basis=basis), kyy, rtol=1e-12, atol=1e-15)
    vjp = lambda cot: np.einsum("mni,niq->mq", cot, jac)  # noqa: E731
    np.testing.assert_allclose(wk.t_matrix(x, kernel=k, basis=basis, vjp=vjp), t, rtol=1e-12, atol=1e-14)
    # adjoint identity <t, Jᵀc> = <J t, c>: the VJP route and the Jacobian route agree in the solve
    g = np.random.default_rng(3).normal(size=jac.shape[2])
    np.testing.assert_allclose(
        wk.kwng_direction(g, x, kernel=k, basis=basis, eps=1e-3, vjp=vjp),
        wk.kwng_direction(g, x, kernel=k, basis=basis, eps=1e-3, jacobian=jac), rtol=1e-10)


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_metric_apply_matches_dense(lam):
    x, jac, g, basis = linear_problem(q=7)
    want = dense_metric(x, jac, Gaussian(1.1), basis, lam) @ g
    got = wk.metric_apply(g, x, kernel=Gaussian(1.1), basis=basis, lam=lam, jacobian=jac)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("q", [5, 30])
@pytest.mark.parametrize("dual", ["dual", "dual-qr"])
def test_primal_equals_dual(q, dual):
    x, jac, g, basis = linear_problem(q=q, m=15, seed=4)
    kw = dict(kernel=Gaussian(AuthorsRule()), basis=basis, jacobian=jac, eps=1e-4, damping="jacobian")
    np.testing.assert_allclose(wk.kwng_direction(g, x, form="primal", **kw),
                               wk.kwng_direction(g, x, form=dual, **kw), rtol=1e-8)


def test_dual_form_handles_cut_directions_at_tiny_eps():
    # whitening leaves exact zero rows in T̃ for cut directions; the Gram-based dual keeps
    # every digit there (a Householder Q picks an arbitrary column for them)
    rng = np.random.default_rng(8)
    t_white = rng.normal(size=(6, 50))
    t_white[[1, 4]] = 0.0
    g = rng.normal(size=50)
    _, sig, wt = np.linalg.svd(t_white, full_matrices=True)
    sig2 = np.concatenate([sig**2, np.zeros(50 - sig.size)])
    for eps in (1e-3, 1e-8, 1e-12):
        exact = wt.T @ ((wt @ g) / (sig2 + eps))
        w = wk.solve_whitened(t_white, g, eps=eps)
        assert np.linalg.norm(w - exact) / np.linalg.norm(exact) < 1e-13


def test_direction_on_every_backend(backend):
    x, jac, g, basis = linear_problem(q=6)
    want = wk.kwng_direction(g, x, kernel=Gaussian(AuthorsRule()), basis=basis, eps=1e-2,
                             lam=0.05, damping="jacobian", jacobian=jac)
    got = wk.kwng_direction(backend.asarray(g), backend.asarray(x), kernel=Gaussian(AuthorsRule()),
                            basis=basis, eps=1e-2, lam=0.05, damping="jacobian",
                            jacobian=backend.asarray(jac))
    backend.assert_close(got, want, rtol=1e-9 if backend.is_float64 else 2e-2,
                         atol=0 if backend.is_float64 else 2e-3 * np.abs(want).max())
    bx = backend.asarray(x)
    for name in ("cc_gram", "k_gram", "cotangents"):
        out = getattr(wk, name)(bx, kernel=Gaussian(1.0), basis=basis)
        backend.assert_close(out, getattr(wk, name)(x, kernel=Gaussian(1.0), basis=basis),
                             atol=0 if backend.is_float64 else 1e-5)


def test_vjp_route_on_every_backend(backend):
    x, jac, g, basis = linear_problem(q=4)
    bjac = backend.asarray(jac)
    xp = backend.xp

    def vjp(cot):
        n, d, q = bjac.shape
        return xp.reshape(cot, (cot.shape[0], n * d)) @ xp.reshape(bjac, (n * d, q))

    got = wk.kwng_direction(backend.asarray(g), backend.asarray(x), kernel=Gaussian(1.0),
                            basis=basis, eps=1e-2, vjp=vjp)
    want = wk.kwng_direction(g, x, kernel=Gaussian(1.0), basis=basis, eps=1e-2, jacobian=jac)
    backend.assert_close(got, want, rtol=1e-9 if backend.is_float64 else 2e-2,
                         atol=0 if backend.is_float64 else 2e-3 * np.abs(want).max())


def _closed_form_error(model, n, m, eps, seed, form="auto", damping="identity"):
    theta = model.default_theta()
    z = model.sample_latent(n, rng=seed)
    g = np.random.default_rng(1000 + seed).normal(size=model.num_params)
    w = wk.kwng_direction(g, model.h(theta, z), kernel=Gaussian(AuthorsRule()),
                          basis=nystrom_basis((n, model.d), m, rng=seed), eps=eps,
                          jacobian=model.jacobian(theta, z), form=form, damping=damping)
    exact = model.natural_gradient(theta, g)
    return np.linalg.norm(w - exact) / np.linalg.norm(exact)


@pytest.mark.slow
@pytest.mark.parametrize("model", [GaussianModel(2), HypersphereModel(3)], ids=["gaussian", "sphere"])
def test_error_against_closed_form_falls_as_n_grows(model):
    # M = ⌊d √N⌋, five seeds; stated tolerance: the median error at N = 1600 is below
    # half the one at N = 50, and below 5 %.
    def median_error(n):
        m = int(model.d * np.sqrt(n))
        return np.median([_closed_form_error(model, n, m, 1e-5, s) for s in range(5)])

    small, large = median_error(50), median_error(1600)
    assert large < small / 2
    assert large < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("form", ["primal", "dual"])
@pytest.mark.parametrize("damping", ["identity", "jacobian"])
def test_error_is_stable_as_eps_vanishes(form, damping):
    model = GaussianModel(3)
    errs = {eps: np.median([_closed_form_error(model, 800, 84, eps, s, form, damping) for s in range(3)])
            for eps in (1e-3, 1e-8)}
    assert errs[1e-8] < 1.5 * errs[1e-3] + 1e-3


@pytest.mark.parametrize(("m", "q"), [(20, 6), (6, 20)], ids=["q<=M", "q>M"])
def test_auto_form_keeps_digits_as_eps_vanishes(m, q):
    from .reference import naive_dual_direction

    rng = np.random.default_rng(5)
    t_white = rng.normal(size=(m, q)) * np.logspace(0, -2, q)[None, :]
    g = rng.normal(size=q)
    eps = 1e-8
    _, sig, wt = np.linalg.svd(t_white, full_matrices=True)  # exact to rounding: W orthonormal
    sig2 = np.concatenate([sig**2, np.zeros(q - sig.size)])
    exact = wt.T @ ((wt @ g) / (sig2 + eps))
    err = lambda w: np.linalg.norm(w - exact) / np.linalg.norm(exact)  # noqa: E731
    auto = err(wk.solve_whitened(t_white, g, eps=eps))
    assert auto < 1e-12
    other = err(wk.solve_whitened(t_white, g, eps=eps, form="dual" if q <= m else "primal"))
    assert other > 100 * auto  # the form auto avoids loses digits as 1/eps
    if q <= m:  # where the answer is O(1), the Woodbury formula as written cancels
        assert err(naive_dual_direction(g, t_white, eps)) > 1e4 * auto


# -- bad input ---------------------------------------------------------------------------------


def _call(**over):
    x, jac, g, basis = linear_problem()
    kw = dict(grad=g, samples=x, kernel=Gaussian(1.0), basis=basis, eps=1e-3, jacobian=jac)
    kw.update(over)
    return wk.kwng_direction(kw.pop("grad"), kw.pop("samples"), **kw)


@pytest.mark.parametrize(
    ("over", "exc", "match"),
    [
        (dict(samples=np.zeros((41, 3))), ValueError, r"jacobian must have shape \(N, d, q\) = \(41, 3, q\)"),
        (dict(samples=np.zeros((40, 2))), ValueError, r"basis dims must be < d = 2|jacobian must have shape"),
        (dict(grad=np.zeros(4)), ValueError, "jacobian's last axis must match grad: q = 4"),
        (dict(grad=np.zeros((5, 1))), ValueError, r"grad must be 1-D"),
        (dict(vjp=lambda c: c), ValueError, "exactly one of jacobian"),
        (dict(jacobian=None), ValueError, "exactly one of jacobian"),
        (dict(jacobian=None, vjp=3), TypeError, "vjp must be callable"),
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
        (dict(eps=-1.0), ValueError, "eps must be a finite number > 0"),
        (dict(eps=float("nan")), ValueError, "eps must be a finite number > 0"),
        (dict(lam=-0.1), ValueError, "lam must be a finite number >= 0"),
        (dict(damping=np.array([1.0, 1.0, -1.0, 1.0, 1.0])), ValueError, "damping must be finite and >= 0"),
        (dict(damping=np.ones(4)), ValueError, r"damping must have shape \(q,\) = \(5,\)"),
        (dict(damping="diag"), ValueError, "damping must be 'identity', 'jacobian'"),
        (dict(basis=NystromBasis([0, 99], [0, 1])), ValueError, "basis indices must be < N = 40"),
        (dict(basis=NystromBasis([0, 1], [0, 3])), ValueError, "basis dims must be < d = 3"),
        (dict(basis=[0, 1]), TypeError, "basis must be a NystromBasis"),
        (dict(kernel="rbf"), TypeError, "kernel must be a wngkernels Kernel"),
        (dict(samples=np.full((40, 3), np.nan)), ValueError, "samples must be finite"),
        (dict(grad=np.array([0, 0, np.inf, 0, 0.0])), ValueError, "grad must be finite"),
        (dict(jacobian=np.full((40, 3, 5), np.nan)), ValueError, "jacobian must be finite"),
        (dict(form="qr"), ValueError, "form must be one of 'auto', 'primal', 'dual', 'dual-qr'"),
        (dict(chunk_size=0), ValueError, "chunk_size must be an int >= 1"),
    ],
)
def test_bad_input_raises(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_bad_vjp_output_raises():
    with pytest.raises(ValueError, match=r"vjp must return shape \(M, q\) = \(12, 5\)"):
        _call(jacobian=None, vjp=lambda c: np.zeros((12, 4)))
    with pytest.raises(ValueError, match="vjp output must be finite"):
        _call(jacobian=None, vjp=lambda c: np.full((12, 5), np.nan))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="vjp must return an array of the samples' library"):
        _call(jacobian=None, vjp=lambda c: torch.zeros(12, 5))


def test_mixed_libraries_raise():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different libraries"):
        _call(grad=torch.zeros(5))


def test_whiten_and_solve_validate():
    with pytest.raises(ValueError, match=r"lam > 0 needs k of shape \(2, 2\)"):
        wk.whiten(np.eye(2), np.ones((2, 3)), lam=1.0)
    with pytest.raises(ValueError, match=r"t must have shape \(M, q\) with M = 2"):
        wk.whiten(np.eye(2), np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"grad must have shape \(q,\) = \(3,\)"):
        wk.solve_whitened(np.ones((2, 3)), np.ones(2), eps=1.0)


@pytest.mark.parametrize("form", ["primal", "dual", "dual-qr"])
def test_factorized_solver_reuses_one_factorisation_for_every_eps(form, backend):
    rng = np.random.default_rng(11)
    t_white, g, dmp = rng.normal(size=(6, 9)), rng.normal(size=9), rng.uniform(0.5, 2.0, 9)
    solver = wk.factorize_whitened(backend.asarray(t_white), damping=backend.asarray(dmp), form=form)
    for eps in (1e-1, 1e-3):
        want = np.linalg.solve(t_white.T @ t_white + eps * np.diag(1 / dmp), g)
        backend.assert_close(solver.solve(backend.asarray(g), eps), want,
                             rtol=1e-8 if backend.is_float64 else 5e-2,
                             atol=0 if backend.is_float64 else 1e-2 * np.abs(want).max())
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        solver.solve(backend.asarray(g), 0.0)
    with pytest.raises(ValueError, match=r"grad must have shape \(q,\) = \(9,\)"):
        solver.solve(backend.asarray(g[:3]), 1e-3)


def test_kwng_direction_validates_at_its_door_and_passes_xp_inward(monkeypatch):
    """One public call: ``eps`` checked once, the namespace resolved by the estimator's door and
    by the kernel's (the bandwidth rule's), not again by every solve step it uses."""
    import wngkernels as wk
    from wngkernels import _backend

    seen = {"namespace": 0, "eps": 0}
    namespace, check = _backend.namespace, _backend.check_positive_scalar

    def counted_namespace(*a, **k):
        seen["namespace"] += 1
        return namespace(*a, **k)

    def counted_check(value, name, **k):
        seen["eps"] += name == "eps"
        return check(value, name, **k)

    rng = np.random.default_rng(0)
    x, jac, g = rng.normal(size=(50, 2)), rng.normal(size=(50, 2, 3)), rng.normal(size=3)
    basis = wk.nystrom_basis(x, 6, rng=1)
    monkeypatch.setattr(_backend, "namespace", counted_namespace)
    monkeypatch.setattr(_backend, "check_positive_scalar", counted_check)
    wk.kwng_direction(g, x, kernel=wk.Gaussian(wk.AuthorsRule()), basis=basis, eps=1e-3,
                      damping="jacobian", jacobian=jac)
    assert seen["eps"] == 1
    assert seen["namespace"] <= 3

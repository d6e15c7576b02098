"""Every bad input and odd situation of the core: a clear error naming the argument, or a
documented safe result checked against an independent float64 truth (issue 15, core part).

Sections: the validators of ``wngkernels._backend``; one exception type per kind of mistake
across the core; scale (the scaling law of ``kwng_direction``, the kernels and the building
blocks); extreme bandwidths; the median heuristic in ``kwng_direction`` on every backend; the
solver's inputs; half precision; a property-based sweep over scales, shapes and dtypes. The
bandwidth rules' own bad input and scaling are tested in ``test_bandwidth.py``.
"""

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wngkernels as wk
from wngkernels import AuthorsRule, Gaussian, MedianHeuristic, NystromBasis, RationalQuadratic, _backend
from wngkernels.models import DiagonalGaussianModel, GaussianModel, HypersphereModel

from .reference import dense_direction, dense_metric, dense_parts


def _problem(n=60, d=2, q=3, m=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    jac = rng.normal(size=(n, d, q))
    return x, jac, rng.normal(size=q), wk.nystrom_basis(x, m, rng=seed)


def _gaussian_hessian(x, y, ell):
    """Closed form (DESIGN §3), float64: ``k (δ_ab/ℓ² − u_a u_b/ℓ⁴)``, ``(n, m, d, d)``."""
    u = x[:, None, :] - y[None, :, :]
    k = np.exp(-np.sum(u * u, axis=-1) / (2 * ell**2))
    return k[..., None, None] * (np.eye(x.shape[1]) / ell**2 - u[..., :, None] * u[..., None, :] / ell**4)


def _rq_hessian(x, y, ell, alpha):
    """Closed form (DESIGN §3), float64, for the rational-quadratic kernel."""
    u = x[:, None, :] - y[None, :, :]
    s = 1 + np.sum(u * u, axis=-1) / (2 * alpha * ell**2)
    eye = np.eye(x.shape[1])
    uu = u[..., :, None] * u[..., None, :]
    s = s[..., None, None]
    return eye / ell**2 * s ** (-alpha - 1) - (alpha + 1) / alpha * uu / ell**4 * s ** (-alpha - 2)


# -- the validators -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [("5", TypeError, "n must be an int; got '5'"), (5.0, TypeError, "n must be an int"),
     (True, TypeError, "n must be an int"), (np.bool_(True), TypeError, "n must be an int"),
     (None, TypeError, "n must be an int"), (np.float64(2.0), TypeError, "n must be an int"),
     (0, ValueError, "n must be an int >= 1; got 0"), (-3, ValueError, "n must be an int >= 1; got -3")],
)
def test_check_int_refuses(value, exc, match):
    with pytest.raises(exc, match=f"^{re.escape(match)}"):
        _backend.check_int(value, "n", minimum=1)


def test_check_int_accepts_integers_of_every_kind_and_bounds():
    assert _backend.check_int(np.int32(7), "n", minimum=1) == 7
    assert type(_backend.check_int(np.int64(7), "n")) is int
    assert _backend.check_int(np.array(4), "n") == 4
    with pytest.raises(ValueError, match=r"^n must be an int <= 3; got 4$"):
        _backend.check_int(4, "n", maximum=3)
    with pytest.raises(ValueError, match=r"^n must be an int in \[1, 3\]; got 0$"):
        _backend.check_int(0, "n", minimum=1, maximum=3)
    torch = pytest.importorskip("torch")
    assert _backend.check_int(torch.tensor(3), "n") == 3
    with pytest.raises(TypeError, match="n must be an int"):
        _backend.check_int(torch.tensor(3.0), "n")


@pytest.mark.parametrize(
    ("value", "exc"),
    [("1", TypeError), (b"1", TypeError), (True, TypeError), (None, TypeError), (1j, TypeError),
     (np.ones(2), TypeError), (math.nan, ValueError), (-math.inf, ValueError)],
)
def test_check_real_refuses(value, exc):
    with pytest.raises(exc, match="^x must be a"):
        _backend.check_real(value, "x")


def test_check_real_and_positive_accept_numbers_of_every_kind():
    assert _backend.check_real(np.float32(-2.5), "x") == -2.5
    assert _backend.check_real(np.array(3.0), "x") == 3.0
    assert _backend.check_positive_scalar(0, "x", allow_zero=True) == 0.0
    with pytest.raises(TypeError, match="x must be a real number"):
        _backend.check_positive_scalar(np.bool_(True), "x")


def test_check_choice_and_check_shape():
    assert _backend.check_choice("a", "opt", ("a", "b")) == "a"
    with pytest.raises(TypeError, match=r"^opt must be one of 'a', 'b'; got 3 of type int$"):
        _backend.check_choice(3, "opt", ("a", "b"))
    with pytest.raises(ValueError, match=r"^opt must be one of 'a', 'b'; got 'c'$"):
        _backend.check_choice("c", "opt", ("a", "b"))
    _backend.check_shape(np.zeros((4, 2, 7)), "j", (4, 2, None), "(N, d, q)")
    with pytest.raises(ValueError, match=r"^j must have shape \(N, d, q\) = \(4, 3, q\); got \(4, 2, 7\)$"):
        _backend.check_shape(np.zeros((4, 2, 7)), "j", (4, 3, None), "(N, d, q)")
    with pytest.raises(ValueError, match=r"^g must have shape \(q,\) = \(3,\); got \(3, 1\)$"):
        _backend.check_shape(np.zeros((3, 1)), "g", (3,), "(q,)")


# -- one exception type per kind of mistake, everywhere in the core ------------------------------

_X, _JAC, _G, _BASIS = _problem(n=20, q=3, m=6)


def _direction(**over):
    kw = dict(kernel=Gaussian(AuthorsRule()), basis=_BASIS, eps=0.1, jacobian=_JAC)
    kw.update(over)
    return wk.kwng_direction(_G, _X, **kw)


_TW = np.random.default_rng(1).normal(size=(4, 3))

#: (name of the argument, a call taking it as its only keyword)
SCALARS = [
    ("eps", lambda v: _direction(eps=v)),
    ("lam", lambda v: _direction(lam=v)),
    ("rcond", lambda v: _direction(rcond=v)),
    ("damping_floor", lambda v: _direction(damping_floor=v, damping="jacobian")),
    ("eps", lambda v: wk.solve_whitened(_TW, _G, eps=v)),
    ("eps", lambda v: wk.factorize_whitened(_TW).solve(_G, v)),
    ("lam", lambda v: wk.whiten(np.eye(4), _TW, k=np.eye(4), lam=v)),
    ("scale", lambda v: wk.whiten(np.eye(4), _TW, scale=v)),
    ("rcond", lambda v: wk.whiten(np.eye(4), _TW, rcond=v)),
    ("floor", lambda v: wk.damping_from_whitened(_TW, floor=v)),
    ("bandwidth", lambda v: Gaussian(v)),
    ("bandwidth", lambda v: RationalQuadratic(v)),
    ("alpha", lambda v: RationalQuadratic(1.0, alpha=v)),
    ("bandwidth", lambda v: Gaussian(1.0).with_bandwidth(v)),
    ("bandwidth", lambda v: Gaussian(lambda y, x: v).resolve(_X, _X)),
]


_BAD_SCALARS = [("str", "0.1", TypeError), ("bool", True, TypeError), ("none", None, TypeError),
                ("array", np.ones(2), TypeError), ("nan", math.nan, ValueError),
                ("inf", math.inf, ValueError), ("negative", -1.0, ValueError)]


@pytest.mark.parametrize(
    ("name", "call", "value", "exc"),
    [pytest.param(name, call, value, exc, id=f"{name}-{i}-{label}")
     for i, (name, call) in enumerate(SCALARS) for label, value, exc in _BAD_SCALARS
     if not (name == "rcond" and value is None)],  # rcond=None is the documented default
)
def test_a_bad_scalar_gets_one_exception_type_everywhere(name, call, value, exc):
    with pytest.raises(exc, match=f"^{name} must be a"):
        call(value)


COUNTS = [
    ("num_basis", lambda v: wk.nystrom_basis((5, 2), v)),
    ("chunk_size", lambda v: wk.cc_gram(_X, kernel=Gaussian(1.0), basis=_BASIS, chunk_size=v)),
    ("chunk_size", lambda v: wk.t_matrix(_X, kernel=Gaussian(1.0), basis=_BASIS, jacobian=_JAC,
                                         chunk_size=v)),
    ("chunk_size", lambda v: _direction(chunk_size=v)),
    ("max_points", lambda v: MedianHeuristic(v)),
    ("d", lambda v: GaussianModel(v)),
    ("d", lambda v: DiagonalGaussianModel(v)),
    ("n", lambda v: GaussianModel(2).sample_latent(v)),
    ("n", lambda v: HypersphereModel(2).sample_latent(v)),
]


@pytest.mark.parametrize(("name", "call"), COUNTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(COUNTS)])
@pytest.mark.parametrize(
    ("value", "exc"),
    [("5", TypeError), (5.0, TypeError), (True, TypeError), (0, ValueError), (-2, ValueError)],
    ids=["str", "float", "bool", "zero", "negative"],
)
def test_a_bad_count_gets_one_exception_type_everywhere(name, call, value, exc):
    with pytest.raises(exc, match=f"^{name} must be"):
        call(value)


CHOICES = [
    ("form", lambda v: _direction(form=v)),
    ("form", lambda v: wk.solve_whitened(_TW, _G, eps=0.1, form=v)),
    ("form", lambda v: wk.factorize_whitened(_TW, form=v)),
    ("damping", lambda v: _direction(damping=v)),
]


@pytest.mark.parametrize(("name", "call"), CHOICES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CHOICES)])
@pytest.mark.parametrize(("value", "exc"), [(3, TypeError), ("qr", ValueError)], ids=["int", "unknown"])
def test_a_bad_option_gets_one_exception_type_everywhere(name, call, value, exc):
    with pytest.raises(exc, match=f"^{name} must be"):
        call(value)


# -- scale ---------------------------------------------------------------------------------------

#: The spectral cut of the comparisons with a float32 result (see the scaling-law test).
RCOND = 1e-3

#: Powers of ten inside each dtype's range where the result is representable: the law must hold.
SCALES = {True: [1e-100, 1e-30, 1e-9, 1e9, 1e30, 1e100], False: [1e-15, 1e-9, 1e-4, 1e4, 1e9, 1e15]}


@pytest.mark.parametrize("damping", ["identity", "jacobian"])
@pytest.mark.parametrize("rule", ["authors", "median", "fixed"])
@pytest.mark.parametrize("i_scale", range(6))
def test_kwng_direction_obeys_its_scaling_law(backend, i_scale, rule, damping):
    """Samples, Jacobian (and a fixed bandwidth, the damping floor) × s, eps × s² (× s for the
    Jacobian damping, whose floor is absolute): the direction is w / s², w the float64 dense truth.
    In float32 the old code was 47 % to 1.4e6× off at s = 1e9–1e12 and raised LinAlgError at s <= 1e-8."""
    s = SCALES[backend.is_float64][i_scale]
    x, jac, g, basis = _problem()
    bandwidth = {"authors": AuthorsRule(), "median": MedianHeuristic(), "fixed": 0.8}[rule]
    eps, floor = 0.1, 0.05
    # a cut well above float32's rounding of the spectrum: float32 is then accurate to ~1e-5 here
    # (with the default cut, M·eps, the pseudo-inverse alone costs it 1e-3, at every scale)
    g_hat = dense_metric(x, jac, Gaussian(bandwidth), basis, rcond=RCOND)
    d_inv = np.ones(3) if damping == "identity" else np.sqrt(np.diag(g_hat)) + floor  # D⁻¹, guard `floor`
    want = np.linalg.solve(g_hat + eps * np.diag(d_inv), g)
    scaled_bw = bandwidth if callable(bandwidth) else bandwidth * s
    w = wk.kwng_direction(backend.asarray(g), backend.asarray(x * s), kernel=Gaussian(scaled_bw), basis=basis,
                          eps=eps * (s * s if damping == "identity" else s), damping=damping,
                          damping_floor=floor * s, jacobian=backend.asarray(jac * s), rcond=RCOND)
    backend.assert_close(w * (s * s), want, rtol=1e-9 if backend.is_float64 else 1e-4)


@pytest.mark.parametrize(("s", "word"), [(1e20, "underflows"), (1e-20, "overflows")])
def test_kwng_direction_beyond_float32_refuses_naming_eps(s, word):
    x, jac, g, basis = _problem()
    f = np.float32
    with pytest.raises(ValueError, match=f"direction {word} float32.*eps="):
        wk.kwng_direction(g.astype(f), (x * s).astype(f), kernel=Gaussian(AuthorsRule()), basis=basis,
                          eps=0.1 * s * s, jacobian=(jac * s).astype(f))


@pytest.mark.parametrize("i_scale", range(6))
def test_building_blocks_scale(backend, i_scale):
    """``C Cᵀ`` ∝ s⁻⁴, ``K`` and ``T`` (Jacobian × s) ∝ s⁻¹·s⁻², cotangents ∝ s⁻²: against the dense truth."""
    s = SCALES[backend.is_float64][i_scale]
    x, jac, _, basis = _problem()
    k = Gaussian(0.8 * s)
    c, kyy, t = dense_parts(x, jac, Gaussian(0.8), basis)
    kw = dict(kernel=k, basis=basis)
    xs = backend.asarray(x * s)
    rtol = 1e-9 if backend.is_float64 else 1e-4
    cc = c @ c.T
    top = math.log10(np.abs(cc).max()) - 4 * math.log10(s)  # C Cᵀ ~ s⁻⁴: in the dtype's normal range?
    info = np.finfo(np.float64 if backend.is_float64 else np.float32)
    if math.log10(info.smallest_normal) < top < math.log10(info.max):
        # entries below the smallest normal number may be flushed to zero (GPUs do): that much absolute error
        atol = max(rtol * np.abs(cc).max(), 2 * info.smallest_normal * s**2 * s**2)
        backend.assert_close(wk.cc_gram(xs, **kw) * s**2 * s**2, cc, rtol=rtol, atol=atol)
    else:
        with pytest.raises(ValueError, match=r"^cc_gram is beyond the range of \S*float\d\d with bandwidth="):
            wk.cc_gram(xs, **kw)
    backend.assert_close(wk.k_gram(xs, **kw) * s**2, kyy, rtol=rtol, atol=rtol * np.abs(kyy).max())
    backend.assert_close(wk.t_matrix(xs, jacobian=backend.asarray(jac * s), **kw) * s, t, rtol=rtol,
                         atol=rtol * np.abs(t).max())
    a = backend.to_numpy(wk.cotangents(xs, **kw)) * s**2
    np.testing.assert_allclose(a.reshape(basis.num_basis, -1), c / np.sqrt(x.shape[0]), rtol=rtol,
                               atol=rtol * np.abs(c).max())


@pytest.mark.parametrize("i_scale", range(6))
@pytest.mark.parametrize("kernel", ["gauss", "rq"])
def test_kernel_methods_scale(backend, i_scale, kernel):
    """``k(sx, sy; sℓ) = k(x, y; ℓ)``, ``∂k ∝ s⁻¹``, ``∂∂k ∝ s⁻²``: against the closed forms."""
    s = SCALES[backend.is_float64][i_scale]
    rng = np.random.default_rng(3)
    x, y, dims = rng.normal(size=(4, 3)), rng.normal(size=(5, 3)), [0, 2, 1, 1]
    ell = 0.9
    want = _gaussian_hessian(x, y, ell) if kernel == "gauss" else _rq_hessian(x, y, ell, 1.5)
    k = Gaussian(ell * s) if kernel == "gauss" else RationalQuadratic(ell * s, alpha=1.5)
    xs, ys = backend.asarray(x * s), backend.asarray(y * s)
    rtol = 1e-10 if backend.is_float64 else 1e-4
    atol = rtol * np.abs(want).max()
    backend.assert_close(k.cross_hessian(xs, ys) * s**2, want, rtol=rtol, atol=atol)
    backend.assert_close(k.cross_hessian_rows(xs, dims, ys) * s**2, want[np.arange(4), :, dims, :],
                         rtol=rtol, atol=atol)
    backend.assert_close(k.cross_hessian_selected(xs, dims, ys, [0, 1, 2, 0, 1]) * s**2,
                         want[np.arange(4)[:, None], np.arange(5)[None, :], np.array(dims)[:, None],
                              np.array([0, 1, 2, 0, 1])[None, :]], rtol=rtol, atol=atol)
    u = x[:, None, :] - y[None, :, :]
    r2 = np.sum(u * u, axis=-1)
    if kernel == "gauss":
        kv, grad = np.exp(-r2 / (2 * ell**2)), -u / ell**2 * np.exp(-r2 / (2 * ell**2))[..., None]
    else:
        base = 1 + r2 / (3 * ell**2)
        kv, grad = base**-1.5, -u / ell**2 * (base**-2.5)[..., None]
    backend.assert_close(k(xs, ys), kv, rtol=rtol, atol=rtol)
    backend.assert_close(k.grad_x(xs, ys) * s, grad, rtol=rtol, atol=rtol * np.abs(grad).max())


@pytest.mark.parametrize("offset", [1e3, 1e6])
def test_cc_gram_is_accurate_when_points_are_far_from_the_mean_in_bandwidths(backend, offset):
    """Two clusters ±offset apart, bandwidth 1: the O(M² N) expansion would cancel (float32 was 235×
    off at 1e4); the rows are used instead."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(20, 2)) + offset, rng.normal(size=(20, 2)) - offset])
    x = backend.to_numpy(backend.asarray(x)).astype(np.float64)  # the backend's rounding of the input
    basis = wk.nystrom_basis(x, 15, rng=1)
    c, _, _ = dense_parts(x, None, Gaussian(1.0), basis)
    got = wk.cc_gram(backend.asarray(x), kernel=Gaussian(1.0), basis=basis)
    rtol = 1e-12 if backend.is_float64 else 1e-5
    backend.assert_close(got, c @ c.T, rtol=rtol, atol=rtol * np.abs(c @ c.T).max())


# -- extreme bandwidths --------------------------------------------------------------------------


@pytest.mark.parametrize("method",
                         ["grad_x", "cross_hessian", "cross_hessian_rows", "cross_hessian_selected",
                          "basis_gram"])
@pytest.mark.parametrize("bandwidth", [1e-200, 1e-170, 1e200])
def test_derivatives_beyond_the_dtype_are_refused_naming_the_bandwidth(backend, method, bandwidth):
    """Once ZeroDivisionError (1e-200) or a silent NaN (1e-170); now a ValueError. grad_x, whose scale
    is 1/ℓ, fits float64 at 1e∓200: there it is the closed form −(u/ℓ²) k, which rounds to 0 at all
    three (k = 0 off the diagonal for the tiny ones, |u|/ℓ² ~ 1e-400 for the large one)."""
    x = backend.asarray(np.random.default_rng(0).normal(size=(3, 2)))
    args = {"grad_x": (x, x), "cross_hessian": (x, x), "cross_hessian_rows": (x, [0, 1, 0], x),
            "cross_hessian_selected": (x, [0, 1, 0], x, [1, 1, 0]), "basis_gram": (x, [0, 1, 0])}[method]
    if method == "grad_x" and backend.is_float64:
        backend.assert_close(Gaussian(bandwidth).grad_x(*args), np.zeros((3, 3, 2)))
        return
    way = "small" if bandwidth < 1 else "large"
    with pytest.raises(ValueError, match=re.escape(f"bandwidth={bandwidth!r} is too {way} for {method}")):
        getattr(Gaussian(bandwidth), method)(*args)


def test_tiny_bandwidth_gives_the_exact_limits(backend):
    """ℓ = 1e-100 (float64) / 1e-15 (float32): distinct points out of reach, coincident ones at δ/ℓ²."""
    ell = 1e-100 if backend.is_float64 else 1e-15
    x = np.random.default_rng(0).normal(size=(3, 2))
    xb = backend.asarray(x)
    k = Gaussian(ell)
    backend.assert_close(k(xb, xb), np.eye(3))
    backend.assert_close(k.grad_x(xb, xb), np.zeros((3, 3, 2)))
    want = np.zeros((3, 3, 2))
    want[np.arange(3), np.arange(3), [0, 1, 0]] = 1 / ell**2
    backend.assert_close(k.cross_hessian_rows(xb, [0, 1, 0], xb), want)
    for a in (k(xb, xb), k.cross_hessian(xb, xb)):
        assert bool(backend.xp.all(backend.xp.isfinite(a)))


def test_kwng_direction_with_a_tiny_fixed_bandwidth_is_finite_and_scale_free():
    """With samples at the bandwidth's scale, a bandwidth of 1e-150 works (ℓ cancels in the direction)."""
    x, jac, g, basis = _problem()
    want = dense_direction(g, x, jac, Gaussian(0.8), basis, 0.1)
    s = 1e-150
    w = wk.kwng_direction(g, x * s, kernel=Gaussian(0.8 * s), basis=basis, eps=0.1 * s * s, jacobian=jac * s)
    np.testing.assert_allclose(w * s * s, want, rtol=1e-9)


def test_lam_times_bandwidth_squared_overflow_is_refused():
    x, jac, g, basis = _problem()
    with pytest.raises(ValueError, match="^lam · bandwidth² overflows"):
        wk.kwng_direction(g, x * 1e200, kernel=Gaussian(1e200), basis=basis, eps=1.0, lam=1e-3,
                          jacobian=jac)


def test_samples_spanning_more_than_the_dtype_in_bandwidths_are_refused():
    x, jac, g, basis = _problem()
    with pytest.raises(ValueError, match=r"^samples span about .* bandwidths \(bandwidth=1e-40\)"):
        wk.kwng_direction(g.astype(np.float32), x.astype(np.float32), kernel=Gaussian(1e-40), basis=basis,
                          eps=1.0, jacobian=jac.astype(np.float32))


# -- the median heuristic in kwng_direction, on every backend -------------------------------------


def test_kwng_direction_with_the_median_heuristic_on_every_backend(backend):
    x, jac, g, basis = _problem(n=30)
    g_hat = dense_metric(x, jac, Gaussian(MedianHeuristic()), basis, rcond=RCOND)
    want = np.linalg.solve(g_hat + 0.1 * np.eye(3), g)
    w = wk.kwng_direction(backend.asarray(g), backend.asarray(x), kernel=Gaussian(MedianHeuristic()),
                          basis=basis, eps=0.1, jacobian=backend.asarray(jac), rcond=RCOND)
    backend.assert_close(w, want, rtol=1e-9 if backend.is_float64 else 1e-4)


# -- the solver's inputs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda b, t, g: wk.solve_whitened(t, b.asarray([0.0, np.nan, 1.0]), eps=0.1), ValueError,
         "^grad must be finite"),
        (lambda b, t, g: wk.factorize_whitened(t).solve(b.asarray([np.inf, 0.0, 1.0]), 0.1), ValueError,
         "^grad must be finite"),
        (lambda b, t, g: wk.solve_whitened(t, g, eps=0.1, damping=b.asarray([1.0, -1.0, 1.0])), ValueError,
         r"^damping must be finite and >= 0"),
        (lambda b, t, g: wk.solve_whitened(t, g, eps=0.1, damping=b.asarray([1.0, np.nan, 1.0])), ValueError,
         r"^damping must be finite and >= 0"),
        (lambda b, t, g: wk.factorize_whitened(t, damping=b.asarray([1.0, np.inf, 1.0])), ValueError,
         r"^damping must be finite and >= 0"),
        (lambda b, t, g: wk.solve_whitened(t, g, eps=0.1, damping=b.asarray([1.0, 1.0])), ValueError,
         r"^damping must have shape \(q,\) = \(3,\); got \(2,\)"),
        (lambda b, t, g: wk.solve_whitened(t, g, eps=0.1, damping=b.asarray(np.ones((3, 1)))), ValueError,
         r"^damping must have shape \(q,\) = \(3,\); got \(3, 1\)"),
        (lambda b, t, g: wk.solve_whitened(t, g, eps=0.1, damping=[1.0, 1.0, 1.0]), TypeError,
         "^damping must be an array"),
        (lambda b, t, g: wk.solve_whitened(t, b.asarray([1.0, 2.0]), eps=0.1), ValueError,
         r"^grad must have shape \(q,\) = \(3,\)"),
        (lambda b, t, g: wk.solve_whitened(t[0, :], g, eps=0.1), ValueError, r"^t_white must be 2-D"),
        (lambda b, t, g: wk.whiten(b.asarray(np.full((4, 4), np.nan)), t), ValueError, "^cc must be finite"),
        (lambda b, t, g: wk.whiten(b.asarray(np.eye(4)), t, k=b.asarray(np.full((4, 4), np.inf)), lam=0.1),
         ValueError, "^k must be finite"),
        (lambda b, t, g: wk.whiten(b.asarray(np.eye(3)), t), ValueError,
         r"^t must have shape \(M, q\) with M = 3"),
        (lambda b, t, g: wk.solve_whitened(t, g, eps=1e-310 if b.is_float64 else 1e-44), ValueError,
         r"^the direction overflows .*eps="),
    ],
    ids=["nan-grad", "inf-grad-solver", "negative-damping", "nan-damping", "inf-damping-factorize",
         "short-damping", "2d-damping", "list-damping", "short-grad", "1d-t", "nan-cc", "inf-k",
         "cc-t-mismatch", "tiny-eps-overflow"],
)
def test_solver_inputs_are_refused_clearly(backend, call, exc, match):
    rng = np.random.default_rng(0)
    t = rng.normal(size=(4, 3))
    t[:, 0] = 0  # a column the metric does not see: w = g/eps there, which a tiny eps overflows
    with pytest.raises(exc, match=match):
        call(backend, backend.asarray(t), backend.asarray(rng.normal(size=3) + 3.0))


def test_whiten_of_a_zero_cc_is_zero_and_solves_to_g_over_eps(backend):
    """No information (``C Cᵀ = 0``, e.g. every basis function out of reach): ``T̃ = 0``, ``w = g/ε``."""
    t = backend.asarray(np.ones((3, 4)))
    tw = wk.whiten(backend.asarray(np.zeros((3, 3))), t)
    backend.assert_close(tw, np.zeros((3, 4)))
    g = np.arange(1.0, 5.0)
    backend.assert_close(wk.solve_whitened(tw, backend.asarray(g), eps=0.5), g / 0.5)


@pytest.mark.parametrize("form", ["primal", "dual", "dual-qr"])
def test_solve_whitened_obeys_its_scaling_law(backend, form):
    """``T̃ × s``, ``ε × s²``: ``w / s²``, in float32 up to s = 1e19 (SᵀS ~ 1e38·q overflowed before),
    against a float64 solve."""
    rng = np.random.default_rng(2)
    tw, g, dmp = rng.normal(size=(4, 6)), rng.normal(size=6) * 1e4, rng.uniform(0.5, 2, size=6)
    want = np.linalg.solve(tw.T @ tw + 0.3 * np.diag(1 / dmp), g)
    for s in ([1e-150, 1e150] if backend.is_float64 else [1e-15, 1e15, 1e19]):
        w = wk.solve_whitened(backend.asarray(tw * s), backend.asarray(g), eps=0.3 * s * s,
                              damping=backend.asarray(dmp), form=form)
        backend.assert_close(w * (s * s), want, rtol=1e-9 if backend.is_float64 else 1e-4)


@pytest.mark.parametrize("column", [1e-25, 1e-12, 1e12, 1e25])
def test_damping_from_whitened_sees_columns_of_any_magnitude(backend, column):
    """Column norms by a per-column scale: in float32 a 1e-25 column squared underflowed to an
    excluded parameter, a 1e25 one overflowed to one."""
    if backend.is_float64:
        column = column**8  # 1e-200 .. 1e200
    tw = np.random.default_rng(0).normal(size=(3, 4))
    norms = np.linalg.norm(tw, axis=0)
    tw[:, 1] *= column
    norms[1] *= column
    want = 1 / (norms + 1e-8)
    got = wk.damping_from_whitened(backend.asarray(tw))
    backend.assert_close(got, want, rtol=1e-12 if backend.is_float64 else 1e-5)


def test_a_non_finite_t_is_passed_on_as_documented():
    """The documented exception: ``t``/``t_white`` are not checked (the torch edge falls back to ``g``
    on a non-finite result); a NaN column stays visible in the result, never silently zero."""
    t = np.ones((3, 2))
    t[0, 1] = np.nan
    tw = wk.whiten(np.eye(3), t)
    assert np.isnan(tw[:, 1]).any() and np.isfinite(tw[:, 0]).all()
    assert wk.damping_from_whitened(tw)[1] == 0  # an unusable column is excluded, not 1/floor


# -- half precision ------------------------------------------------------------------------------


def _halves():
    out = [pytest.param(("numpy", "float16"), id="numpy-float16")]
    for dt in ("float16", "bfloat16"):
        out.append(pytest.param(("torch", dt), id=f"torch-{dt}"))
    return out


@pytest.fixture(params=_halves())
def half(request):
    """(to-array, to-numpy, dtype) of one half-precision type."""
    lib, name = request.param
    if lib == "numpy":
        return (lambda a: np.asarray(a, dtype=np.float16)), (lambda a: np.asarray(a, np.float64)), np.float16
    torch = pytest.importorskip("torch")
    dt = getattr(torch, name)
    return (lambda a: torch.tensor(np.asarray(a), dtype=dt)), (lambda a: a.double().numpy()), dt


def test_half_precision_is_computed_in_float32_and_returned_in_the_input_dtype(half):
    to, back, dtype = half
    x, jac, g, basis = _problem()
    xh, jh, gh = to(x), to(jac), to(g)
    x64, j64, g64 = back(xh), back(jh), back(gh)  # the inputs as the half type rounds them
    rtol = 2e-2 if "bfloat16" in str(dtype) else 4e-3  # the output's own rounding, and a little more
    k = Gaussian(AuthorsRule())

    def close(got, want):
        assert got.dtype == dtype
        np.testing.assert_allclose(back(got), want, rtol=rtol, atol=rtol * np.abs(want).max())

    close(wk.kwng_direction(gh, xh, kernel=k, basis=basis, eps=0.1, jacobian=jh),
          dense_direction(g64, x64, j64, k, basis, 0.1))
    close(wk.kwng_direction(gh, xh, kernel=k, basis=basis, eps=0.1, jacobian=jh, damping="jacobian"),
          wk.kwng_direction(g64, x64, kernel=k, basis=basis, eps=0.1, jacobian=j64, damping="jacobian"))
    c, kyy, t = dense_parts(x64, j64, k, basis)
    close(wk.cc_gram(xh, kernel=k, basis=basis), c @ c.T)
    close(wk.k_gram(xh, kernel=k, basis=basis), kyy)
    close(wk.t_matrix(xh, kernel=k, basis=basis, jacobian=jh), t)
    ell = k.resolve(x64[basis.indices], x64).bandwidth
    close(Gaussian(ell).cross_hessian(xh[:5], xh[:4]), _gaussian_hessian(x64[:5], x64[:4], ell))
    r2 = np.sum((x64[:5, None] - x64[None, :4]) ** 2, -1)
    close(Gaussian(ell)(xh[:5], xh[:4]), np.exp(-r2 / (2 * ell**2)))
    tw = wk.whiten(to(c @ c.T), to(t))
    tw64 = wk.whiten(back(to(c @ c.T)), back(to(t)))
    close(to(back(tw).T @ back(tw)), tw64.T @ tw64)  # Ĝ = T̃ᵀT̃: free of the eigenvectors' signs
    close(wk.damping_from_whitened(tw), 1 / (np.linalg.norm(back(tw), axis=0) + 1e-8))
    close(wk.solve_whitened(tw, gh, eps=0.1), np.linalg.solve(back(tw).T @ back(tw) + 0.1 * np.eye(3), g64))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_float16_overflow_is_refused(lib):
    """w = g/ε on the directions the metric does not see (q > M): 1e3/1e-3 = 1e6 > 65504 (float16's
    largest number; bfloat16 has float32's range)."""
    if lib == "numpy":
        to = lambda a: np.asarray(a, dtype=np.float16)  # noqa: E731
    else:
        torch = pytest.importorskip("torch")
        to = lambda a: torch.tensor(np.asarray(a), dtype=torch.float16)  # noqa: E731
    x, jac, g, basis = _problem(q=20, m=4)
    with pytest.raises(ValueError, match="direction w overflows"):
        wk.kwng_direction(to(g * 1e3), to(x), kernel=Gaussian(AuthorsRule()), basis=basis, eps=1e-3,
                          jacobian=to(jac))
    with pytest.raises(ValueError, match="bandwidth=0.001 is too small for cross_hessian"):
        Gaussian(1e-3).cross_hessian(to(x[:3]), to(x[:3]))


# -- property-based: any scale, shape and dtype ---------------------------------------------------

#: the arguments a refusal may name, and nothing else
_NAMES = ("eps", "bandwidth", "samples", "jacobian", "grad")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_kwng_direction_is_correct_or_refuses_clearly(backend, data):
    """Over scales, shapes, kernels, bandwidths and dampings, the only outcomes are the float64 dense
    truth (through the scaling law) or a ValueError/TypeError naming an argument."""
    f64 = backend.is_float64
    if backend.name.startswith("jax"):  # JAX compiles per shape (1-3 s): one shape, every scale and option
        n, d, q, m = 12, 2, 4, 5
    else:
        n = data.draw(st.integers(3, 25), "N")
        d = data.draw(st.integers(1, 3), "d")
        q = data.draw(st.integers(1, 6), "q")
        m = data.draw(st.integers(1, min(n * d, 16)), "M")
    seed = data.draw(st.integers(0, 2**16), "seed")
    log_s = data.draw(st.integers(-150, 150) if f64 else st.integers(-22, 22), "log10 s")
    eps0 = 10 ** data.draw(st.floats(-1, 1), "log10 eps")
    damping = data.draw(st.sampled_from(["identity", "jacobian"]), "damping")
    rule = data.draw(st.sampled_from(["authors", "median", "fixed"]), "rule")
    rq = data.draw(st.booleans(), "rational quadratic")
    s = 10.0**log_s
    rng = np.random.default_rng(seed)
    x, jac, g = rng.normal(size=(n, d)), rng.normal(size=(n, d, q)), rng.normal(size=q)
    basis = wk.nystrom_basis(x, m, rng=seed)

    def kernel(scale):
        bw = {"authors": AuthorsRule(), "median": MedianHeuristic()}.get(rule, 0.9 * scale)
        return RationalQuadratic(bw, alpha=1.3) if rq else Gaussian(bw)

    floor = 0.05
    g_hat = dense_metric(x, jac, kernel(1.0), basis, rcond=RCOND)
    d_inv = np.ones(q) if damping == "identity" else np.sqrt(np.diag(g_hat)) + floor
    want = np.linalg.solve(g_hat + eps0 * np.diag(d_inv), g)
    eps = eps0 * (s * s if damping == "identity" else s)
    try:
        w = wk.kwng_direction(backend.asarray(g), backend.asarray(x * s), kernel=kernel(s), basis=basis,
                              eps=eps, damping=damping, damping_floor=floor * s,
                              jacobian=backend.asarray(jac * s), rcond=RCOND)
    except (ValueError, TypeError) as exc:
        assert any(name in str(exc) for name in _NAMES), f"the message names no argument: {exc}"
        # a refusal only where the answer w/s² leaves the dtype's normal range (2 decades of margin)
        info = np.finfo(np.float64 if f64 else np.float32)
        top = math.log10(np.abs(want).max()) - 2 * log_s
        assert not math.log10(info.smallest_normal) + 2 < top < math.log10(info.max) - 2, str(exc)
        return
    except Exception as exc:  # noqa: BLE001 - anything else is the bug this test is for
        raise AssertionError(f"raw {type(exc).__name__}: {exc}") from exc
    got = backend.to_numpy(w) * (s * s)
    assert np.all(np.isfinite(got))
    # float32: an eigenvalue of C Cᵀ near the cut makes the pseudo-inverse sensitive to rounding;
    # 1 % still catches every scale error (they were 47 % to 1e6×)
    tol = 1e-6 if f64 else 1e-2
    assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want), (got, want)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(log_s=st.integers(-160, 160), n=st.integers(1, 4), d=st.integers(1, 4), rq=st.booleans(),
       seed=st.integers(0, 2**16))
def test_kernels_are_correct_or_refuse_clearly(backend, log_s, n, d, rq, seed):
    """Every kernel method at any scale: the closed form through the scaling law, or a ValueError
    naming the bandwidth."""
    f64 = backend.is_float64
    if not f64:
        log_s = log_s // 6  # float32: 1e-27 .. 1e26
    if backend.name.startswith("jax"):  # JAX compiles per shape: one shape, every scale
        n, d = 3, 2
    s = 10.0**log_s
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n + 1, d))
    want = _rq_hessian(x, y, 1.1, 2.0) if rq else _gaussian_hessian(x, y, 1.1)
    k = RationalQuadratic(1.1 * s, alpha=2.0) if rq else Gaussian(1.1 * s)
    try:
        h = k.cross_hessian(backend.asarray(x * s), backend.asarray(y * s))
    except ValueError as exc:
        assert str(exc).startswith("bandwidth="), str(exc)
        limit = 153 if f64 else 18  # 1/ℓ² within [smallest normal, max/16]
        assert abs(log_s) > limit, str(exc)
        return
    rtol = 1e-10 if f64 else 1e-4
    # entries below the smallest normal number may be flushed to zero (XLA and GPUs do)
    tiny = float(np.finfo(np.float64 if f64 else np.float32).smallest_normal)
    atol = max(rtol * np.abs(want).max(), 2 * tiny * s * s)
    np.testing.assert_allclose(backend.to_numpy(h) * s * s, want, rtol=rtol, atol=atol)


def test_the_nystrom_basis_rejects_a_float_count_and_refuses_bad_pairs():
    with pytest.raises(TypeError, match="^num_basis must be an int"):
        wk.nystrom_basis(np.zeros((5, 2)), np.float64(3.0))
    with pytest.raises(TypeError, match="indices must hold integers"):
        NystromBasis([0.5, 1.0], [0, 1])

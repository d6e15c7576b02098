"""Bandwidth rules (``wngkernels.bandwidth``): ``AuthorsRule`` and ``MedianHeuristic``.

Each rule is checked against an independent float64 NumPy reference: ``AuthorsRule`` against
the brute-force mean of all ``M × N`` squared distances (and the centred form), ``MedianHeuristic``
against ``numpy.median`` of the squared distances; then resolution on data through
``Kernel.resolve`` on every backend, the scaling law ``rule(s y, s x) = s rule(y, x)``, extreme
``log_bandwidth``, fewer points than ``max_points``, and the refusals of bad arguments and
coincident points.
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wngkernels import AuthorsRule, Gaussian, MedianHeuristic

from .strategies import points

# -- against brute force and numpy.median ------------------------------------------------------


@given(points(n_max=6), st.floats(-2, 2))
def test_authors_rule_equals_brute_force_mean(xy, log_bw):
    y, x = xy
    sq = ((y[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    if sq.mean() == 0:
        return
    np.testing.assert_allclose(AuthorsRule(log_bw)(y, x), np.sqrt(10**log_bw * sq.mean()), rtol=1e-12)


def test_median_heuristic_equals_numpy_median():
    rng = np.random.default_rng(1)
    y, x = rng.normal(size=(7, 3)), rng.normal(size=(9, 3))
    d2 = ((y[:, None, :] - x[None, :, :]) ** 2).sum(-1).ravel()
    assert MedianHeuristic()(y, x) == pytest.approx(np.sqrt(np.median(d2)), rel=1e-12)


def test_authors_rule_from_the_mean_square_is_the_rule():
    """The one home of the rule's formula: the rule on (Y, X) equals ``from_mean_square`` of the
    mean squared distance computed densely; 10^400 · mean square does not overflow."""
    from wngkernels import AuthorsRule

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3)) * 1e3
    y = x[:4]
    mean_sq = np.mean(((y[:, None] - x[None]) ** 2).sum(-1))
    rule = AuthorsRule(0.5)
    assert rule(y, x) == pytest.approx(np.sqrt(10**0.5 * mean_sq), rel=1e-12)
    assert rule.from_mean_square(mean_sq) == pytest.approx(rule(y, x), rel=1e-12)
    assert AuthorsRule(400).from_mean_square(4.0) == pytest.approx(2e200, rel=1e-12)
    with pytest.raises(ValueError, match="all equal"):
        rule.from_mean_square(0.0)


# -- resolution on data ------------------------------------------------------------------------


def test_rule_bandwidth_resolves_on_data(backend):
    rng = np.random.default_rng(2)
    y, x = rng.normal(size=(4, 2)), rng.normal(size=(6, 2))
    k = Gaussian(AuthorsRule(0.5))
    fixed = k.resolve(backend.asarray(y), backend.asarray(x))
    assert isinstance(fixed.bandwidth, float)
    assert fixed.bandwidth == pytest.approx(AuthorsRule(0.5)(y, x), rel=backend.rtol)
    assert fixed.resolve(y, x) is fixed
    backend.assert_close(k(backend.asarray(y), backend.asarray(x)), Gaussian(fixed.bandwidth)(y, x))


# -- scale and extremes ------------------------------------------------------------------------


@pytest.mark.parametrize("s", [1e-150, 1e-20, 1e20, 1e150])
def test_bandwidth_rules_scale(backend, s):
    """``rule(s y, s x) = s rule(y, x)`` (no squared distance over- or underflows), against NumPy."""
    if not backend.is_float64 and max(s, 1 / s) > 1e30:
        s = 1e30 if s > 1 else 1e-30
    rng = np.random.default_rng(4)
    y, x = rng.normal(size=(3, 2)), rng.normal(size=(7, 2))
    center = x.mean(axis=0)
    authors = math.sqrt(np.mean(np.sum((y - center) ** 2, 1)) + np.mean(np.sum((x - center) ** 2, 1)))
    sq = np.sum((y[:, None, :] - x[None, :, :]) ** 2, axis=-1).ravel()
    median = math.sqrt(np.median(sq[sq > 0]))
    ys, xs = backend.asarray(y * s), backend.asarray(x * s)
    rtol = 1e-12 if backend.is_float64 else 1e-5
    assert AuthorsRule()(ys, xs) / s == pytest.approx(authors, rel=rtol)
    assert MedianHeuristic()(ys, xs) / s == pytest.approx(median, rel=rtol)


def test_authors_rule_with_an_extreme_log_bandwidth():
    """log_bandwidth = 400 was an OverflowError: the bandwidth is 1e200 · the usual one; 700 leaves
    the float range and is refused."""
    x = np.random.default_rng(0).normal(size=(10, 2))
    assert AuthorsRule(400)(x, x) == pytest.approx(1e200 * AuthorsRule()(x, x), rel=1e-12)
    assert AuthorsRule(-400)(x, x) == pytest.approx(1e-200 * AuthorsRule()(x, x), rel=1e-12)
    with pytest.raises(ValueError, match=r"^AuthorsRule gave bandwidth 1e\+350 \(with log_bandwidth=700.0\)"):
        AuthorsRule(700)(x, x)
    with pytest.raises(ValueError, match="^log_bandwidth must be a finite number"):
        AuthorsRule(math.inf)


@pytest.mark.parametrize(("n", "max_points"), [(7, 1000), (7, 3), (1, 1000)])
def test_median_heuristic_with_fewer_points_than_max_points(backend, n, max_points):
    """array_api_strict refuses out-of-range slices: once an IndexError below 1000 points."""
    rng = np.random.default_rng(5)
    y, x = rng.normal(size=(4, 2)), rng.normal(size=(n, 2))
    yy, xx = y[:max_points], x[:max_points]
    sq = np.sum((yy[:, None, :] - xx[None, :, :]) ** 2, axis=-1).ravel()
    want = math.sqrt(np.median(sq[sq > 0]))
    got = MedianHeuristic(max_points)(backend.asarray(y), backend.asarray(x))
    assert got == pytest.approx(want, rel=1e-12 if backend.is_float64 else 1e-5)


# -- bad input ---------------------------------------------------------------------------------


def test_rules_refuse_coincident_points():
    z = np.ones((3, 2))
    with pytest.raises(ValueError, match="AuthorsRule gave bandwidth 0.0"):
        AuthorsRule()(z, z)
    with pytest.raises(ValueError, match="MedianHeuristic gave bandwidth 0.0"):
        MedianHeuristic()(z, z)


def test_bad_log_bandwidth_and_max_points_raise():
    with pytest.raises(ValueError, match="log_bandwidth must be a finite number"):
        AuthorsRule(float("nan"))
    with pytest.raises(ValueError, match="max_points must be an int >= 1"):
        MedianHeuristic(0)


@pytest.mark.parametrize("value", ["1", True, None])
def test_log_bandwidth_of_a_wrong_type_is_a_type_error(value):
    with pytest.raises(TypeError, match="^log_bandwidth must be a real number"):
        AuthorsRule(value)


@pytest.mark.parametrize("rule", [AuthorsRule(), MedianHeuristic()], ids=["authors", "median"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["y", "x"])
def test_rules_refuse_non_finite_points_naming_them(backend, rule, bad, where):
    """The rules read the largest entry once (their scale and the finiteness check in one): a NaN
    or Inf in either argument is a ValueError naming that argument, never a bandwidth."""
    rng = np.random.default_rng(0)
    y, x = rng.normal(size=(3, 2)), rng.normal(size=(5, 2))
    (y if where == "y" else x)[1, 0] = bad
    with pytest.raises(ValueError, match=f"^{where} must be finite"):
        rule(backend.asarray(y), backend.asarray(x))


# -- the deferred rule: on the device, NaN where the call raises ---------------------------------


@pytest.mark.parametrize("s", [1e-30, 1.0, 1e30])
def test_the_deferred_authors_rule_is_the_rule_left_on_the_device(backend, s):
    """``deferred`` reads nothing back and gives the call's bandwidth as a 0-d float64 array of the
    points' library and device, at any scale the dtype holds."""
    if not backend.is_float64 and s != 1.0:
        s = s ** (1 / 3)  # inside float32's range
    rng = np.random.default_rng(3)
    y, x = s * rng.normal(size=(4, 3)), s * rng.normal(size=(9, 3))
    sq = ((y[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    got = AuthorsRule(0.5).deferred(backend.asarray(y), backend.asarray(x))
    assert tuple(got.shape) == () and np.dtype(backend.to_numpy(got).dtype) == np.float64
    assert float(backend.to_numpy(got)) == pytest.approx(math.sqrt(10**0.5 * sq.mean()),
                                                       rel=1e-12 if backend.is_float64 else 1e-5)
    called = AuthorsRule(0.5)(backend.asarray(y), backend.asarray(x))
    assert float(backend.to_numpy(got)) == pytest.approx(called, rel=1e-14)  # the same sums, in float64


@pytest.mark.parametrize("case", ["coincident", "nan-y", "inf-x", "log_bandwidth=700"])
def test_the_deferred_authors_rule_is_nan_where_the_rule_raises(backend, case):
    rng = np.random.default_rng(4)
    y, x = rng.normal(size=(3, 2)), rng.normal(size=(5, 2))
    rule = AuthorsRule(700 if case.startswith("log") else 0.0)
    if case == "coincident":
        y, x = np.ones((3, 2)), np.ones((5, 2))
    elif case == "nan-y":
        y[1, 1] = math.nan
    elif case == "inf-x":
        x[0, 0] = math.inf
    with pytest.raises(ValueError):
        rule(backend.asarray(y), backend.asarray(x))
    assert math.isnan(float(backend.to_numpy(rule.deferred(backend.asarray(y), backend.asarray(x)))))

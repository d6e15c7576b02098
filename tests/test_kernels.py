"""Kernels: derivatives against central finite differences, identities, backends, bad input."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wngkernels import Gaussian, RationalQuadratic

from .strategies import points

H = 1e-5  # central-difference step (float64): truncation ~1e-10, rounding ~1e-11


kernels = st.one_of(
    st.builds(Gaussian, st.floats(0.3, 3.0)),
    st.builds(RationalQuadratic, st.floats(0.3, 3.0), st.floats(0.2, 5.0)),
)


def fd_grad_x(k, x, y):
    """Central differences of k(x, y) in each coordinate of x: (n, m, d)."""
    out = np.empty((x.shape[0], y.shape[0], x.shape[1]))
    for a in range(x.shape[1]):
        e = np.zeros(x.shape[1])
        e[a] = H
        out[:, :, a] = (k(x + e, y) - k(x - e, y)) / (2 * H)
    return out


def fd_cross_hessian(k, x, y):
    """Central differences of grad_x in each coordinate of y: (n, m, d, d)."""
    out = np.empty((x.shape[0], y.shape[0], x.shape[1], x.shape[1]))
    for b in range(x.shape[1]):
        e = np.zeros(x.shape[1])
        e[b] = H
        out[..., b] = (k.grad_x(x, y + e) - k.grad_x(x, y - e)) / (2 * H)
    return out


def assert_fd_close(analytic, fd, scale):
    # relative 1e-6 where entries are O(scale); near-zero entries against the scale
    np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-7 * scale)


@given(points(), kernels)
def test_grad_x_matches_finite_differences(xy, k):
    x, y = xy
    assert_fd_close(k.grad_x(x, y), fd_grad_x(k, x, y), scale=1.0 / k.bandwidth)


@given(points(), kernels)
def test_cross_hessian_matches_finite_differences(xy, k):
    x, y = xy
    assert_fd_close(k.cross_hessian(x, y), fd_cross_hessian(k, x, y), scale=1.0 / k.bandwidth**2)


@given(points(), kernels, st.integers(0, 2**32 - 1))
def test_directional_derivative_matches_finite_differences(xy, k, seed):
    x, y = xy
    v = np.random.default_rng(seed).normal(size=x.shape[1])
    fd = (k(x + H * v, y) - k(x - H * v, y)) / (2 * H)
    assert_fd_close(k.grad_x(x, y) @ v, fd, scale=np.linalg.norm(v) / k.bandwidth)


@given(points(), kernels)
def test_torch_derivatives_match_finite_differences(xy, k):
    torch = pytest.importorskip("torch")
    x, y = xy
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    assert_fd_close(k.grad_x(tx, ty).numpy(), fd_grad_x(k, x, y), scale=1.0 / k.bandwidth)
    assert_fd_close(k.cross_hessian(tx, ty).numpy(), fd_cross_hessian(k, x, y), scale=1.0 / k.bandwidth**2)


@given(points(), kernels)
def test_kernel_and_cross_hessian_are_symmetric(xy, k):
    x, y = xy
    np.testing.assert_allclose(k(x, y), k(y, x).T, rtol=1e-14)
    np.testing.assert_allclose(
        k.cross_hessian(x, y), np.transpose(k.cross_hessian(y, x), (1, 0, 3, 2)), rtol=1e-13, atol=1e-15
    )


@given(points(n_max=6), kernels)
def test_derivative_feature_gram_is_positive_semidefinite(xy, k):
    x, _ = xy
    n, d = x.shape
    gram = np.transpose(k.cross_hessian(x, x), (0, 2, 1, 3)).reshape(n * d, n * d)
    np.testing.assert_allclose(gram, gram.T, atol=1e-14)
    eig = np.linalg.eigvalsh(gram)
    assert eig.min() >= -1e-10 * max(1.0, eig.max())


@given(points(), kernels, st.integers(0, 2**32 - 1))
def test_row_forms_equal_entries_of_the_full_cross_hessian(xy, k, seed):
    x, y = xy
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    dims_x = rng.integers(0, d, size=x.shape[0])
    dims_y = rng.integers(0, d, size=y.shape[0])
    full = k.cross_hessian(x, y)
    loop_rows = np.stack([full[m, :, dims_x[m], :] for m in range(x.shape[0])])
    np.testing.assert_allclose(k.cross_hessian_rows(x, dims_x, y), loop_rows, rtol=1e-13, atol=1e-15)
    loop_sel = np.array([[full[m, p, dims_x[m], dims_y[p]] for p in range(y.shape[0])]
                         for m in range(x.shape[0])])
    np.testing.assert_allclose(k.cross_hessian_selected(x, dims_x, y, dims_y), loop_sel,
                               rtol=1e-13, atol=1e-15)
    # K of the estimator: the selected entries at the basis on both sides, symmetric
    loop_k = np.array([[k.cross_hessian(x[a:a + 1], x[b:b + 1])[0, 0, dims_x[a], dims_x[b]]
                        for b in range(x.shape[0])] for a in range(x.shape[0])])
    basis_k = k.basis_gram(x, dims_x)
    np.testing.assert_array_equal(basis_k, basis_k.T)
    np.testing.assert_allclose(basis_k, loop_k, rtol=1e-13, atol=1e-15)


def test_closed_forms_at_known_points():
    x = np.zeros((1, 2))
    y = np.array([[1.0, 2.0]])
    g = Gaussian(2.0)
    k = np.exp(-5.0 / 8.0)
    np.testing.assert_allclose(g(x, y), [[k]])
    np.testing.assert_allclose(g.grad_x(x, y)[0, 0], -(x - y)[0] / 4.0 * k)
    rq = RationalQuadratic(2.0, alpha=0.5)
    s = 1 + 5.0 / (2 * 0.5 * 4.0)
    np.testing.assert_allclose(rq(x, y), [[s**-0.5]])
    # RQ tends to the Gaussian as alpha grows
    np.testing.assert_allclose(RationalQuadratic(2.0, alpha=1e7)(x, y), g(x, y), rtol=1e-6)


@pytest.mark.parametrize("kernel", [Gaussian(0.8), RationalQuadratic(1.3, alpha=0.7)], ids=["gauss", "rq"])
def test_every_method_preserves_namespace_dtype_device(backend, kernel):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3))
    y = rng.normal(size=(4, 3))
    dims_x, dims_y = [0, 2, 1, 1, 0], [2, 2, 0, 1]
    bx, by = backend.asarray(x), backend.asarray(y)
    backend.assert_close(kernel(bx, by), kernel(x, y))
    backend.assert_close(kernel.grad_x(bx, by), kernel.grad_x(x, y), atol=1e-6)
    backend.assert_close(kernel.cross_hessian(bx, by), kernel.cross_hessian(x, y), atol=1e-6)
    backend.assert_close(kernel.cross_hessian_rows(bx, dims_x, by),
                         kernel.cross_hessian_rows(x, dims_x, y), atol=1e-6)
    backend.assert_close(kernel.cross_hessian_selected(bx, dims_x, by, dims_y),
                         kernel.cross_hessian_selected(x, dims_x, y, dims_y), atol=1e-6)
    backend.assert_close(kernel.basis_gram(bx, dims_x), kernel.basis_gram(x, dims_x), atol=1e-6)
    # coordinate indices may also live in the caller's namespace, on its device
    idx = backend.xp.asarray(dims_x, device=backend.device)
    backend.assert_close(kernel.cross_hessian_rows(bx, idx, by),
                         kernel.cross_hessian_rows(x, dims_x, y), atol=1e-6)


def test_integer_input_promotes_to_default_float():
    out = Gaussian(1.0)(np.arange(6).reshape(3, 2), np.arange(4).reshape(2, 2))
    assert out.dtype == np.float64
    torch = pytest.importorskip("torch")
    out = Gaussian(1.0)(torch.arange(6).reshape(3, 2), torch.arange(4).reshape(2, 2))
    assert out.dtype == torch.get_default_dtype()


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_bandwidth_raises(bandwidth):
    with pytest.raises(ValueError, match="bandwidth must be a finite number > 0"):
        Gaussian(bandwidth)
    with pytest.raises(ValueError, match="bandwidth must be a finite number > 0"):
        RationalQuadratic(bandwidth)


@pytest.mark.parametrize("alpha", [0.0, -2.0, float("nan"), float("inf")])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        RationalQuadratic(1.0, alpha=alpha)


@pytest.mark.parametrize("method", ["__call__", "grad_x", "cross_hessian"])
def test_bad_arrays_raise_naming_the_argument(method):
    k = Gaussian(1.0)
    f = getattr(k, method)
    good = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"x must be 2-D \(n, d\); got shape \(3,\)"):
        f(np.zeros(3), good)
    with pytest.raises(ValueError, match=r"y must be 2-D"):
        f(good, np.zeros((1, 3, 2)))
    with pytest.raises(ValueError, match="same number of features d; got 2 and 3"):
        f(good, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="y must be finite"):
        f(good, np.array([[0.0, np.inf]]))
    with pytest.raises(ValueError, match="x must be finite"):
        f(np.array([[np.nan, 0.0]]), good)
    with pytest.raises(ValueError, match="x must be non-empty"):
        f(np.zeros((0, 2)), good)
    with pytest.raises(TypeError, match="x must be an array"):
        f([[0.0, 1.0]], good)


def test_mixed_libraries_raise():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different libraries"):
        Gaussian(1.0).cross_hessian(np.zeros((2, 2)), torch.zeros(2, 2))


def test_bad_dims_raise():
    k = Gaussian(1.0)
    x, y = np.zeros((3, 2)), np.ones((4, 2))
    with pytest.raises(ValueError, match=r"dims must have shape \(3,\)"):
        k.cross_hessian_rows(x, [0, 1], y)
    with pytest.raises(ValueError, match=r"dims must lie in \[0, 2\); got values in \[0, 2\]"):
        k.cross_hessian_rows(x, [0, 1, 2], y)
    with pytest.raises(ValueError, match=r"dims must lie in \[0, 2\)"):
        k.cross_hessian_rows(x, [-1, 1, 0], y)
    with pytest.raises(TypeError, match="dims must hold integers"):
        k.cross_hessian_rows(x, [0.0, 1.0, 0.5], y)
    with pytest.raises(ValueError, match=r"dims_y must have shape \(4,\)"):
        k.cross_hessian_selected(x, [0, 1, 0], y, [0])
    with pytest.raises(ValueError, match=r"dims must lie in \[0, 2\)"):
        k.basis_gram(x, [0, 3, 0])
    with pytest.raises(ValueError, match="points must be finite"):
        k.basis_gram(np.array([[0.0, np.nan], [1.0, 1.0]]), [0, 1])
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"dims must lie in \[0, 2\)"):
        k.cross_hessian_rows(torch.zeros(3, 2), torch.tensor([0, 5, 1]), torch.ones(4, 2))

import numpy as np
import pytest

from wngkernels.models import (
    DiagonalGaussianModel,
    GaussianModel,
    HypersphereModel,
    w2_diagonal_gaussians,
    w2_diagonal_gaussians_grad,
)

MODELS = [GaussianModel(3), HypersphereModel(4), DiagonalGaussianModel(3)]
IDS = ["gaussian", "sphere", "diag"]


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_jacobian_matches_finite_differences(model):
    rng = np.random.default_rng(0)
    theta = model.default_theta() + 0.3 * rng.normal(size=model.num_params)
    z = model.sample_latent(7, rng=1)
    h = 1e-6
    fd = np.stack([(model.h(theta + h * e, z) - model.h(theta - h * e, z)) / (2 * h)
                   for e in np.eye(model.num_params)], axis=-1)
    np.testing.assert_allclose(model.jacobian(theta, z), fd, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_metric_is_the_monte_carlo_mean_of_jtj(model):
    theta = model.default_theta()
    z = model.sample_latent(200000, rng=2)
    jac = model.jacobian(theta, z)
    mc = np.einsum("niq,nir->qr", jac, jac) / z.shape[0]
    np.testing.assert_allclose(mc, model.metric(theta), atol=0.03 * model.num_params)
    g = np.arange(1.0, model.num_params + 1)
    np.testing.assert_allclose(model.metric(theta) @ model.natural_gradient(theta, g), g, rtol=1e-14)


def test_sphere_samples_lie_on_the_sphere():
    z = HypersphereModel(5).sample_latent(100, rng=0)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-14)


def test_models_follow_the_input_namespace(backend):
    model = GaussianModel(2)
    z = backend.asarray(model.sample_latent(5, rng=0))
    theta = model.default_theta(like=z)
    backend.assert_close(model.h(theta, z), model.h(model.default_theta(), model.sample_latent(5, rng=0)))
    assert tuple(model.jacobian(theta, z).shape) == (5, 2, 3)


def test_w2_and_gradient():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=6), rng.normal(size=6)
    assert w2_diagonal_gaussians(a, b) == pytest.approx(((a - b) ** 2).sum())
    h = 1e-6
    fd = np.array([(w2_diagonal_gaussians(a + h * e, b) - w2_diagonal_gaussians(a - h * e, b)) / (2 * h)
                   for e in np.eye(6)])
    np.testing.assert_allclose(w2_diagonal_gaussians_grad(a, b), fd, rtol=1e-7)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="d must be an int >= 1"):
        GaussianModel(0)
    m = GaussianModel(2)
    with pytest.raises(ValueError, match=r"theta must have shape \(3,\)"):
        m.h(np.zeros(2), np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"z must have shape \(N, 2\)"):
        m.jacobian(np.zeros(3), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"grad must have shape \(3,\)"):
        m.natural_gradient(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(2d,\)"):
        w2_diagonal_gaussians(np.zeros(3), np.zeros(3))

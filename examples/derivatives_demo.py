"""Print each kernel derivative next to its central finite difference (NumPy, float64)."""

import numpy as np

from wngkernels import Gaussian, RationalQuadratic

rng = np.random.default_rng(0)
x, y = rng.normal(size=(3, 4)), rng.normal(size=(2, 4))
h = 1e-5
eye = np.eye(4) * h
print(f"{"kernel":<44} {'derivative':<14} {'max |analytic - FD|':>20} {'max |analytic|':>15}")
for k in (Gaussian(1.0), RationalQuadratic(1.0, alpha=0.5)):
    fd_grad = np.stack([(k(x + e, y) - k(x - e, y)) / (2 * h) for e in eye], axis=-1)
    fd_hess = np.stack([(k.grad_x(x, y + e) - k.grad_x(x, y - e)) / (2 * h) for e in eye], axis=-1)
    for name, exact, fd in (("grad_x", k.grad_x(x, y), fd_grad), ("cross_hessian", k.cross_hessian(x, y), fd_hess)):
        print(f"{k!r:<44} {name:<14} {np.abs(exact - fd).max():>20.2e} {np.abs(exact).max():>15.3f}")

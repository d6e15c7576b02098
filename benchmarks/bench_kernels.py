"""asv: the kernel's cross Hessian, row-selected (what the estimator uses) and full (small sizes)."""

from __future__ import annotations

from . import _backends, _problems


class CrossHessianRows(_problems.Timed):
    """``Gaussian.cross_hessian_rows(points (M, d), dims, samples (N, d))`` -> ``(M, N, d)``."""

    sizes = _problems.ROWS_SIZES
    params = [list(_backends.BACKENDS), list(sizes)]
    param_names = ["backend", "size"]
    timeout = 600
    build = staticmethod(_problems.cross_hessian_rows_case)

    def time_cross_hessian_rows(self, backend, size):
        self.run()


class CrossHessian(_problems.Timed):
    """``Gaussian.cross_hessian(points (M, d), samples (N, d))`` -> ``(M, N, d, d)``."""

    sizes = _problems.FULL_SIZES
    params = [list(_backends.BACKENDS), list(sizes)]
    param_names = ["backend", "size"]
    timeout = 600
    build = staticmethod(_problems.cross_hessian_case)

    def time_cross_hessian(self, backend, size):
        self.run()

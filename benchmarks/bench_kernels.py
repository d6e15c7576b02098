"""asv: the kernel's cross Hessian, row-selected (what the estimator uses) and full (small sizes)."""

from __future__ import annotations

from . import _backends, _problems


class CrossHessianRows:
    """``Gaussian.cross_hessian_rows(points (M, d), dims, samples (N, d))`` -> ``(M, N, d)``."""

    params = [list(_backends.BACKENDS), list(_problems.ROWS_SIZES)]
    param_names = ["backend", "size"]
    timeout = 600

    def setup(self, backend, size):
        be = _backends.get(backend)
        self.run = _problems.cross_hessian_rows_case(be, _problems.ROWS_SIZES[size])
        if be.is_gpu:
            self.run()  # warm-up: CUDA context, kernels, allocator

    def time_cross_hessian_rows(self, backend, size):
        self.run()


class CrossHessian:
    """``Gaussian.cross_hessian(points (M, d), samples (N, d))`` -> ``(M, N, d, d)``."""

    params = [list(_backends.BACKENDS), list(_problems.FULL_SIZES)]
    param_names = ["backend", "size"]
    timeout = 600

    def setup(self, backend, size):
        be = _backends.get(backend)
        self.run = _problems.cross_hessian_case(be, _problems.FULL_SIZES[size])
        if be.is_gpu:
            self.run()

    def time_cross_hessian(self, backend, size):
        self.run()

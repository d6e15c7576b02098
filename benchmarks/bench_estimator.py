"""asv: chunked ``C Cᵀ``, the full ``kwng_direction`` (primal and dual), memory.

Sizes are labelled ``N…-d…-M…`` (``benchmarks/_problems.py``). Time benchmarks synchronise the
GPU inside the timed call; ``peakmem_`` benchmarks read the host's peak RSS of the benchmark
process (asv's measure, setup and imports included); ``track_`` benchmarks return the GPU's peak
bytes (``torch.cuda.max_memory_allocated`` or CuPy's pool).
"""

from __future__ import annotations

from . import _backends, _problems

BACKENDS = list(_backends.BACKENDS)


class CCGram(_problems.Timed):
    """``cc_gram(samples (N, d), kernel, basis)``: ``C Cᵀ`` accumulated over chunks of samples."""

    sizes = _problems.ESTIMATOR_SIZES
    params = [BACKENDS, list(sizes)]
    param_names = ["backend", "size"]
    build = staticmethod(_problems.cc_gram_case)

    def time_cc_gram(self, backend, size):
        self.run()


class MatmulSameFlops(_problems.Timed):
    """The products of ``C Cᵀ`` alone (``2 M² N d`` FLOPs), ``cc_gram``'s chunks: its floor."""

    sizes = _problems.ESTIMATOR_SIZES
    params = [BACKENDS, list(sizes)]
    param_names = ["backend", "size"]
    build = staticmethod(_problems.matmul_chunked_case)

    def time_matmul_chunked(self, backend, size):
        self.run()


class KWNGPrimal(_problems.Timed):
    """``kwng_direction`` with the Gaussian model's Jacobian, ``q = d + 1 <= M`` (primal form)."""

    sizes = _problems.ESTIMATOR_SIZES
    params = [BACKENDS, list(sizes)]
    param_names = ["backend", "size"]
    build = staticmethod(_problems.kwng_primal_case)

    def time_kwng_direction(self, backend, size):
        self.run()


class KWNGDual(_problems.Timed):
    """``kwng_direction`` through a VJP with ``q = 5000 > M`` (dual form)."""

    sizes = _problems.DUAL_SIZES
    params = [BACKENDS, list(sizes)]
    param_names = ["backend", "size"]
    build = staticmethod(_problems.kwng_dual_case)

    def time_kwng_direction(self, backend, size):
        self.run()


class PeakMemory:
    """Host peak memory at the issue's size ``N = 1e5, d = 10, M = 1000`` (inputs included)."""

    params = [BACKENDS]
    param_names = ["backend"]
    timeout = 1800

    def setup(self, backend):
        self.be = _backends.get(backend)
        _problems.check_size(_problems.LARGE)

    def peakmem_cc_gram(self, backend):
        _problems.cc_gram_case(self.be, _problems.LARGE)()

    def peakmem_kwng_direction(self, backend):
        _problems.kwng_primal_case(self.be, _problems.LARGE)()


class GPUMemory:
    """GPU peak bytes at ``N = 1e5, d = 10, M = 1000`` (inputs included); GPU backends only."""

    params = [BACKENDS]
    param_names = ["backend"]
    unit = "bytes"
    timeout = 600

    def setup(self, backend):
        self.be = _backends.get(backend)
        if not self.be.is_gpu:
            raise NotImplementedError(f"{backend} is not a GPU backend")
        _problems.check_size(_problems.LARGE)

    def _peak(self, build):
        self.be.reset_peak_memory()
        build(self.be, _problems.LARGE)()
        return self.be.peak_memory()

    def track_cc_gram_gpu_peak_bytes(self, backend):
        return self._peak(_problems.cc_gram_case)

    def track_kwng_direction_gpu_peak_bytes(self, backend):
        return self._peak(_problems.kwng_primal_case)

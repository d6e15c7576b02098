"""The timed cases, shared by the asv classes and ``run_table.py``.

Each ``*_case(backend, size, dtype)`` builds its inputs once on the backend's device and returns
a zero-argument callable that runs the operation and, on a GPU, synchronises before returning,
so that a wall-clock timer around it measures the work and not the launch. Builders raise
``NotImplementedError`` (asv's skip) for a size the case does not cover here.

Problem sizes are :class:`Size` triples ``(N, d, M)``: ``N`` samples in ``R^d`` and a Nyström
basis of ``M`` (point, coordinate) pairs. Labels such as ``"N1e4-d10-M500"`` are what asv shows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

import wngkernels
from wngkernels.models import GaussianModel

from . import _backends
from ._backends import Backend


class Size(NamedTuple):
    """``N`` samples, ``d`` features, ``M`` basis pairs."""

    n: int
    d: int
    m: int

    @property
    def label(self) -> str:
        return f"N{_short(self.n)}-d{self.d}-M{self.m}"

    @property
    def cc_flops(self) -> float:
        """Floating-point operations of the products of ``C Cᵀ``: ``2 M² N d``."""
        return 2.0 * self.m * self.m * self.n * self.d


def _short(n: int) -> str:
    e = int(math.floor(math.log10(n) + 1e-9))
    return f"1e{e}" if 10**e == n else f"{n / 10**e:g}e{e}" if n % 10**e == 0 else str(n)


def by_label(sizes) -> dict[str, Size]:
    return {s.label: s for s in sizes}


#: ``cross_hessian_rows(points (M, d), dims, samples (N, d))`` -> ``(M, N, d)``.
ROWS_SIZES = by_label([Size(1_000, 2, 100), Size(10_000, 10, 500), Size(10_000, 64, 100)])
#: ``cross_hessian(points (M, d), samples (N, d))`` -> ``(M, N, d, d)``: small sizes only.
FULL_SIZES = by_label([Size(1_000, 2, 100), Size(1_000, 10, 100), Size(200, 64, 50)])
#: ``cc_gram`` and the primal ``kwng_direction``: up to the issue's N = 1e5, d = 10, M = 1000.
ESTIMATOR_SIZES = by_label(
    [Size(1_000, 2, 100), Size(10_000, 10, 500), Size(10_000, 64, 250), Size(100_000, 10, 1_000)]
)
#: The dual ``kwng_direction`` materialises the ``(M, N, d)`` cotangents of its VJP: small N·d·M.
DUAL_SIZES = by_label([Size(1_000, 2, 100), Size(10_000, 10, 500)])
#: The size of the issue's ``C Cᵀ`` and memory targets.
LARGE = Size(100_000, 10, 1_000)
#: The size of the issue's ``kwng_direction`` speed target.
TARGET = Size(10_000, 10, 500)
#: Parameters of the dual regime: ``q`` and the rank of the synthetic Jacobian.
DUAL_Q = 5_000
DUAL_RANK = 64
#: Damping of every ``kwng_direction`` case.
EPS = 1e-5
#: Largest cotangent / kernel-row array (bytes) a case may materialise in one piece.
MAX_MATERIALISED = 2**30


def max_n() -> float:
    """``N`` above which cases are skipped: ``$WNGKERNELS_BENCH_MAX_N`` (default: no limit).

    For smoke runs on a slow machine, e.g. ``WNGKERNELS_BENCH_MAX_N=1e4 asv run --quick``.
    """
    raw = os.environ.get("WNGKERNELS_BENCH_MAX_N", "")
    return float(raw) if raw.strip() else math.inf


def check_size(size: Size) -> None:
    if size.n > max_n():
        raise NotImplementedError(f"N = {size.n} > WNGKERNELS_BENCH_MAX_N = {max_n():g}")


def itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def _run(be: Backend, fn: Callable[[], object]) -> Callable[[], None]:
    if be.needs_warmup:  # a GPU or JAX: the timed call ends when the result is ready
        def call():
            be.wait(fn())
    else:
        def call():
            fn()
    return call


def kernel(size: Size) -> wngkernels.Gaussian:
    """A Gaussian kernel with a fixed bandwidth ``sqrt(d)`` (the scale of ``N(0, I_d)`` samples).

    Fixed so that the timings are of the estimator, not of a bandwidth rule.
    """
    return wngkernels.Gaussian(bandwidth=math.sqrt(size.d))


def host_samples(size: Size, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((size.n, size.d))


def basis(size: Size) -> wngkernels.NystromBasis:
    return wngkernels.nystrom_basis((size.n, size.d), size.m, rng=1)


# -- kernels ------------------------------------------------------------------------------------


def _check_materialised(size: Size, dtype: str, factor: int = 1) -> None:
    nbytes = factor * size.m * size.n * size.d * itemsize(dtype)
    if nbytes > MAX_MATERIALISED:
        raise NotImplementedError(f"{size.label}: {nbytes / 2**30:.1f} GiB in one array")


def cross_hessian_rows_case(be: Backend, size: Size, dtype: str = "float64"):
    """``Gaussian.cross_hessian_rows(points, dims, samples)`` -> ``(M, N, d)``."""
    check_size(size)
    _check_materialised(size, dtype)
    x = host_samples(size)
    b = basis(size)
    samples = be.asarray(x, dtype)
    points = be.asarray(x[b.indices], dtype)
    dims = be.asarray(b.dims.astype(np.int64), None)
    k = kernel(size)
    return _run(be, lambda: k.cross_hessian_rows(points, dims, samples))


def cross_hessian_case(be: Backend, size: Size, dtype: str = "float64"):
    """``Gaussian.cross_hessian(points (M, d), samples (N, d))`` -> ``(M, N, d, d)``."""
    check_size(size)
    _check_materialised(size, dtype, factor=size.d)
    x = host_samples(size)
    samples = be.asarray(x, dtype)
    points = be.asarray(x[: size.m], dtype)
    k = kernel(size)
    return _run(be, lambda: k.cross_hessian(points, samples))


# -- the estimator ------------------------------------------------------------------------------


def cc_gram_case(be: Backend, size: Size, dtype: str = "float64", chunk_size: int | None = None):
    """Chunked ``C Cᵀ`` (``M × M``); memory ``O(M² + chunk · M · d)``."""
    check_size(size)
    samples = be.asarray(host_samples(size), dtype)
    b, k = basis(size), kernel(size)
    return _run(be, lambda: wngkernels.cc_gram(samples, kernel=k, basis=b, chunk_size=chunk_size))


def kwng_primal_case(be: Backend, size: Size, dtype: str = "float64"):
    """``kwng_direction`` with ``q = d + 1 <= M``: the seed's Gaussian model and its Jacobian."""
    check_size(size)
    model = GaussianModel(size.d)
    theta = model.default_theta()
    z = host_samples(size)
    samples = be.asarray(model.h(theta, z), dtype)
    jacobian = be.asarray(model.jacobian(theta, z), dtype)
    grad = be.asarray(np.random.default_rng(2).standard_normal(model.num_params), dtype)
    b, k = basis(size), kernel(size)
    return _run(be, lambda: wngkernels.kwng_direction(
        grad, samples, kernel=k, basis=b, eps=EPS, jacobian=jacobian))


def kwng_dual_case(be: Backend, size: Size, dtype: str = "float64", q: int = DUAL_Q):
    """``kwng_direction`` with ``q > M`` through a VJP (``form="auto"`` picks the dual form).

    The model is linear with a random Jacobian of rank ``r = min(64, M)`` held factored,
    ``J = F W`` with ``F`` ``(N d, r)`` and ``W`` ``(r, q)``, so that ``q = 5000`` fits in memory
    at every size; the VJP is ``A ↦ (A F) W``. The estimator materialises the ``(M, N, d)``
    cotangents on this path, hence the small sizes.
    """
    check_size(size)
    _check_materialised(size, dtype, factor=2)
    if q <= size.m:
        raise NotImplementedError(f"q = {q} <= M = {size.m} is the primal regime")
    import array_api_compat

    rng = np.random.default_rng(3)
    rank = min(DUAL_RANK, size.m)
    nd = size.n * size.d
    f = be.asarray(rng.standard_normal((nd, rank)) / math.sqrt(nd), dtype)
    w = be.asarray(rng.standard_normal((rank, q)), dtype)
    grad = be.asarray(rng.standard_normal(q), dtype)
    samples = be.asarray(host_samples(size), dtype)
    b, k = basis(size), kernel(size)

    def vjp(cot):
        xp = array_api_compat.array_namespace(cot)
        return (xp.reshape(cot, (cot.shape[0], nd)) @ f) @ w

    return _run(be, lambda: wngkernels.kwng_direction(
        grad, samples, kernel=k, basis=b, eps=EPS, vjp=vjp))


# -- the matmul of the same FLOP count as C Cᵀ -----------------------------------------------


def chunk_samples(size: Size, dtype: str) -> int:
    """Samples per chunk that ``cc_gram`` picks by default (``wngkernels.estimator.CHUNK_BYTES``)."""
    from wngkernels.estimator import CHUNK_BYTES

    return max(1, min(size.n, CHUNK_BYTES // (4 * size.m * size.d * itemsize(dtype))))


def _operand(be: Backend, rows: int, cols: int, dtype: str, block: int = 1 << 16):
    """A ``(rows, cols)`` array of random-looking values, built on the device from one block."""
    import array_api_compat

    base = be.asarray(np.random.default_rng(4).standard_normal((rows, min(cols, block))), dtype)
    if cols <= block:
        return base
    xp = array_api_compat.array_namespace(base)
    reps, rest = divmod(cols, block)
    parts = [base] * reps + ([base[:, :rest]] if rest else [])
    return xp.concat(parts, axis=1)


def matmul_dense_case(be: Backend, size: Size, dtype: str = "float64", limit: float = 16 * 2**30):
    """``A @ A.T`` with ``A`` ``(M, N d)``: the FLOPs of ``C Cᵀ`` in one dense product.

    Skipped (``NotImplementedError``) when ``A`` would take more than ``limit`` bytes.
    """
    check_size(size)
    nbytes = size.m * size.n * size.d * itemsize(dtype)
    if nbytes > limit:
        raise NotImplementedError(f"A would take {nbytes / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB")
    a = _operand(be, size.m, size.n * size.d, dtype)
    return _run(be, lambda: a @ a.T)


def matmul_chunked_case(be: Backend, size: Size, dtype: str = "float64"):
    """The products of ``C Cᵀ`` alone: ``Σ_chunks A_c A_cᵀ`` with ``cc_gram``'s own chunks.

    Same FLOPs (``2 M² N d``), same operand shapes, no kernel evaluation: the floor that
    ``cc_gram`` can reach with its chunking.
    """
    import array_api_compat

    check_size(size)
    step = chunk_samples(size, dtype)
    a = _operand(be, size.m, step * size.d, dtype)
    starts = range(0, size.n, step)

    xp = array_api_compat.array_namespace(a)
    dev = array_api_compat.device(a)

    def products():
        acc = xp.zeros((size.m, size.m), dtype=a.dtype, device=dev)
        for start in starts:
            cols = (min(start + step, size.n) - start) * size.d
            part = a[:, :cols]
            acc = acc + part @ part.T
        return acc

    return _run(be, products)


class Timed:
    """Shared asv ``setup``: build the case ``build`` for (backend, size label); warm GPUs up.

    Subclasses set ``sizes`` (label → size), ``params``, ``param_names`` and ``build`` (a case
    builder of this module) and define one ``time_`` method calling ``self.run()``.
    """

    sizes: dict = {}
    timeout = 1800  # the N = 1e5 cases take minutes on a small CPU

    @staticmethod
    def build(be, size):
        raise NotImplementedError

    def setup(self, backend, size):
        be = _backends.get(backend)
        self.run = type(self).build(be, type(self).sizes[size])
        if be.needs_warmup:
            self.run()  # warm-up: CUDA context, cuBLAS handles, allocator; JAX's compilation

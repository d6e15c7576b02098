r"""The estimator on Dask arrays: two computes per call, then the core's ``M × M`` steps on NumPy."""

from __future__ import annotations

import dask.array as da

from .. import _backend
from ..estimator import _apply_metric, _damping, _direction, _whiten_means
from ..kernels import Kernel
from ..nystrom import NystromBasis
from ..solve import _FORMS, DAMPING_FLOOR
from ._frame import first_pass
from ._inputs import XP, check_small, inputs
from ._sums import means

_NO_VJP = ("vjp is not supported on Dask arrays (its cotangents are (M, N, d), as long as the samples): "
           "pass jacobian (N, d, q), a Dask array chunked like samples along N")


def _jacobian_only(jacobian, vjp) -> None:
    if vjp is not None:
        raise ValueError(_NO_VJP)
    if jacobian is None:
        raise ValueError("pass jacobian (N, d, q), a Dask array chunked like samples along N")


def _check_damping(damping) -> None:
    """The core's checks of a string, and NumPy or Dask for an array (before any compute)."""
    if isinstance(damping, str):
        if damping != "jacobian":
            _damping(XP, damping, None, DAMPING_FLOOR)
        return
    check_small(damping, "damping", "(q,)")


def _system_scalars(lam, rcond):
    lam = _backend.check_positive_scalar(lam, "lam", allow_zero=True)
    if rcond is not None:
        rcond = _backend.check_positive_scalar(rcond, "rcond", allow_zero=True)
    return lam, rcond


def _lazy(a):
    """A NumPy result as a Dask array of one chunk."""
    return da.from_array(a, chunks=a.shape)


def cc_gram(samples, *, kernel: Kernel, basis: NystromBasis, chunk_size: int | None = None):
    r""":math:`CC^\top = N^{-1}\sum_n H_n H_n^\top` from Dask samples.

    ``H_n[m, i] = ∂_{x_{i_m}}∂_{y_i}k(Y_m, X_n)``, as :func:`wngkernels.cc_gram`: each block of
    samples contributes its sum, and the blocks' sums are added in the graph. Two computes over the
    samples (their statistics, then the sums).

    Parameters
    ----------
    samples : dask.array.Array, shape (N, d)
        Chunked along ``N`` only (one chunk along ``d``).
    kernel : Kernel
        A float bandwidth, :class:`~wngkernels.AuthorsRule` or :class:`~wngkernels.MedianHeuristic`.
    basis : NystromBasis
    chunk_size : int, optional
        Samples per chunk *within* a block (as in the core); default: as many as keep a chunk's
        temporaries near :data:`~wngkernels.estimator.CHUNK_BYTES`.

    Returns
    -------
    dask.array.Array, shape (M, M)
        Symmetric positive semi-definite; one chunk, computed already (wrapping a NumPy array).
    """
    args = inputs(samples)
    frame, _, _ = first_pass(args, kernel, basis, chunk_size)
    cc, _ = means(frame, args, with_jacobian=False)
    return _lazy(frame.host().in_units(cc, 4, "cc_gram"))


def t_matrix(samples, *, kernel: Kernel, basis: NystromBasis, jacobian=None, vjp=None,
             chunk_size: int | None = None):
    r""":math:`T` ``(M, q)`` from Dask samples and a Dask Jacobian.

    .. math:: T_{m,:} = N^{-1}\textstyle\sum_{n,i} \partial_{x_{i_m}}\partial_{y_i} k(Y_m, X_n)\, J_{n,i,:},

    as :func:`wngkernels.t_matrix` with a Jacobian.

    Parameters
    ----------
    samples : dask.array.Array, shape (N, d)
        Chunked along ``N`` only.
    kernel : Kernel
    basis : NystromBasis
    jacobian : dask.array.Array, shape (N, d, q)
        ``jacobian[n, i, :] = ∇_θ h_θ(Z_n)_i``, with the chunks of ``samples`` along ``N`` and one
        chunk along ``d`` and ``q``.
    vjp : None
        Not supported on Dask arrays (a ``ValueError``): the cotangents are ``(M, N, d)``.
    chunk_size : int, optional
        Samples per chunk within a block.

    Returns
    -------
    dask.array.Array, shape (M, q)
        One chunk, computed already.
    """
    _jacobian_only(jacobian, vjp)
    args = inputs(samples, jacobian)
    frame, _, _ = first_pass(args, kernel, basis, chunk_size)
    _, t = means(frame, args, with_jacobian=True)
    return _lazy(frame.host().in_units(t, 2, "t_matrix"))


def kwng_direction(grad, samples, *, kernel: Kernel, basis: NystromBasis, eps: float,
                   lam: float = 0.0, damping="identity", jacobian=None, vjp=None,
                   rcond: float | None = None, chunk_size: int | None = None, form: str = "auto",
                   damping_floor: float = DAMPING_FLOOR):
    r"""The kernelized Wasserstein natural gradient from Dask arrays.

    :math:`w = (\hat G + \varepsilon D^{-1})^{-1} g` with
    :math:`\hat G = T^\top (CC^\top + \lambda K)^\dagger T`, as :func:`wngkernels.kwng_direction`.
    The sums over the samples, :math:`\sum_n H_nH_n^\top` and :math:`\sum_{n,i} H_n[:, i]\,J_{n,i,:}`,
    are taken block by block in one ``dask.compute``, after one compute of the samples'
    statistics (mean, spread, the bandwidth rule's statistics, the basis points); the ``M × M``
    whitening and the solve then run on NumPy with the core's functions.

    Parameters
    ----------
    grad : numpy.ndarray or dask.array.Array, shape (q,)
        Euclidean gradient ``g``.
    samples : dask.array.Array, shape (N, d)
        ``X_n = h_θ(Z_n)``, chunked along ``N`` only (one chunk along ``d``); known chunk sizes.
    kernel : Kernel
        With a float bandwidth, :class:`~wngkernels.AuthorsRule` or
        :class:`~wngkernels.MedianHeuristic` (other rules would need every sample in memory).
    basis : NystromBasis
    eps : float
        Damping :math:`\varepsilon > 0`.
    lam : float
        RKHS regularisation :math:`\lambda \ge 0`.
    damping : {"identity", "jacobian"} or array of shape (q,)
        As in :func:`wngkernels.kwng_direction`; an array may be NumPy or Dask.
    jacobian : dask.array.Array, shape (N, d, q)
        ``jacobian[n, i, :] = ∇_θ h_θ(Z_n)_i``, with the chunks of ``samples`` along ``N`` and one
        chunk along ``d`` and ``q``. Required.
    vjp : None
        Not supported on Dask arrays (a ``ValueError``).
    rcond, form, damping_floor
        As in :func:`wngkernels.kwng_direction`.
    chunk_size : int, optional
        Samples per chunk within a block: a block's temporaries take ``O(M · chunk · d)``.

    Returns
    -------
    dask.array.Array, shape (q,)
        One chunk, computed already (a NumPy array wrapped by ``dask.array.from_array``), in the
        inputs' floating dtype.

    Raises
    ------
    ValueError
        As the core, naming the argument (``samples`` or ``jacobian`` holding NaN or Inf among
        them); and for chunks along ``d`` or ``q``, chunks of ``jacobian`` along ``N`` unlike
        those of ``samples``, unknown chunk sizes, or ``vjp``.
    TypeError
        As the core; and for ``samples`` or ``jacobian`` that are not Dask arrays (in-memory arrays
        go to :func:`wngkernels.kwng_direction`), ``grad`` or ``damping`` neither NumPy nor Dask,
        or a bandwidth rule other than the two above.

    Notes
    -----
    Memory: one block of samples and its slice of the Jacobian per thread, plus ``O(M² + M q)``
    per partial sum; nothing of size ``N`` is gathered. Each block decides on its own whether
    ``C Cᵀ`` comes from the ``O(M² n)`` expansion or from the rows (the core's criterion,
    ``EXPANSION_RADIUS`` of :mod:`wngkernels.estimator`, applied to the block's samples), so values agree
    with the core to rounding.
    """
    eps = _backend.check_positive_scalar(eps, "eps")
    damping_floor = _backend.check_positive_scalar(damping_floor, "damping_floor")
    form = _backend.check_choice(form, "form", _FORMS)
    lam, rcond = _system_scalars(lam, rcond)
    _jacobian_only(jacobian, vjp)
    _check_damping(damping)
    args = inputs(samples, jacobian, grad, "grad")
    frame, grad, (damping,) = first_pass(args, kernel, basis, chunk_size, (damping,))
    ctx = frame.host()
    t_white = _whiten_means(ctx, *means(frame, args, with_jacobian=True), lam, rcond)
    return _lazy(_direction(ctx, grad, t_white, eps, damping, form, damping_floor))


def metric_apply(v, samples, *, kernel: Kernel, basis: NystromBasis, lam: float = 0.0,
                 jacobian=None, vjp=None, rcond: float | None = None, chunk_size: int | None = None):
    r"""The estimated metric applied to a vector, from Dask arrays.

    :math:`\hat G v = T^\top (CC^\top + \lambda K)^\dagger T v`, as :func:`wngkernels.metric_apply`,
    computed as :func:`kwng_direction` is.

    Parameters
    ----------
    v : numpy.ndarray or dask.array.Array, shape (q,)
    samples, kernel, basis, lam, jacobian, vjp, rcond, chunk_size
        As in :func:`kwng_direction`.

    Returns
    -------
    dask.array.Array, shape (q,)
        One chunk, computed already, in the inputs' floating dtype.
    """
    lam, rcond = _system_scalars(lam, rcond)
    _jacobian_only(jacobian, vjp)
    args = inputs(samples, jacobian, v, "v")
    frame, v, _ = first_pass(args, kernel, basis, chunk_size)
    ctx = frame.host()
    t_white = _whiten_means(ctx, *means(frame, args, with_jacobian=True), lam, rcond)
    return _lazy(_apply_metric(ctx, v, t_white))

"""Validation of the Dask edge's arguments: types, shapes, chunks and dtypes, before any compute.

The rules are the core's (:mod:`wngkernels._backend`): a wrong type is a ``TypeError``, a wrong
value or shape a ``ValueError``, and every message names the argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from .. import _backend

#: The core's NumPy namespace (through the one door): every block and every host step uses it.
XP = _backend.namespace(np.empty(0))

_CORE = "wngkernels.kwng_direction, cc_gram, t_matrix and metric_apply"


@dataclass(frozen=True)
class Inputs:
    """Validated arrays: ``samples`` ``(N, d)`` and ``jacobian`` ``(N, d, q)`` (or ``None``), both
    chunked along ``N`` only, with the same chunks; ``vector`` ``(q,)`` (NumPy or Dask) or
    ``None``, named ``vector_name``; ``out`` the results' dtype and ``work`` the dtype the blocks
    compute in."""

    samples: Any
    jacobian: Any
    vector: Any
    vector_name: str
    out: Any
    work: Any

    @property
    def shape(self) -> tuple[int, int]:
        return self.samples.shape


def _known(a, name: str) -> None:
    if any(math.isnan(s) for s in a.shape):
        raise ValueError(f"{name} must have known chunk sizes; got shape {a.shape}: call "
                         f"{name}.compute_chunk_sizes() first")


def check_samples(samples) -> None:
    """``samples`` is a 2-D non-empty Dask array chunked along ``N`` only."""
    if not isinstance(samples, da.Array):
        raise TypeError(
            f"samples must be a dask.array.Array (N, d); got {type(samples).__name__}: for arrays in "
            f"memory use the core ({_CORE})"
        )
    if samples.ndim != 2:
        raise ValueError(f"samples must be 2-D (N, d); got shape {samples.shape}")
    _known(samples, "samples")
    if 0 in samples.shape:
        raise ValueError(f"samples must be non-empty; got shape {samples.shape}")
    if len(samples.chunks[1]) != 1:
        raise ValueError(
            f"samples must be chunked along N only (one chunk along d); got chunks {samples.chunks[1]} "
            "along d: use samples.rechunk({1: -1})"
        )


def check_jacobian(jacobian, samples) -> None:
    """``jacobian`` is a Dask array ``(N, d, q)`` with the chunks of ``samples`` along ``N``, one
    chunk along ``d`` and ``q``."""
    if not isinstance(jacobian, da.Array):
        raise TypeError(f"jacobian must be a dask.array.Array (N, d, q) chunked like samples along N; "
                        f"got {type(jacobian).__name__}")
    _known(jacobian, "jacobian")
    n, d = samples.shape
    _backend.check_shape(jacobian, "jacobian", (n, d, None), "(N, d, q)")
    if len(jacobian.chunks[1]) != 1 or len(jacobian.chunks[2]) != 1:
        raise ValueError(
            f"jacobian must be chunked along N only (one chunk along d and q); got chunks "
            f"{jacobian.chunks[1]} along d and {jacobian.chunks[2]} along q: use "
            "jacobian.rechunk({1: -1, 2: -1})"
        )
    if jacobian.chunks[0] != samples.chunks[0]:
        raise ValueError(
            f"jacobian must have the chunks of samples along N: samples {samples.chunks[0]}, jacobian "
            f"{jacobian.chunks[0]}; use jacobian.rechunk({{0: samples.chunks[0]}})"
        )


def check_small(a, name: str, shape: str):
    """A NumPy or Dask array (a ``(q,)`` vector or the damping's diagonal); anything else is a
    ``TypeError``. Returned as it is: a Dask one is computed with the samples' statistics."""
    if not isinstance(a, (np.ndarray, da.Array)):
        raise TypeError(f"{name} must be a NumPy or Dask array {shape}; got {type(a).__name__}")
    return a


def inputs(samples, jacobian=None, vector=None, vector_name: str = "grad") -> Inputs:
    """Validate the arrays of one call (types, shapes, chunks); the result and work dtypes follow
    the core's rules (:func:`wngkernels._backend.result_float_dtype`)."""
    check_samples(samples)
    if vector is not None:
        check_small(vector, vector_name, "(q,)")
        if vector.ndim != 1:
            raise ValueError(f"{vector_name} must be 1-D (q,); got shape {tuple(vector.shape)}")
    if jacobian is not None:
        check_jacobian(jacobian, samples)
        if vector is not None and jacobian.shape[2] != vector.shape[0]:
            raise ValueError(f"jacobian's last axis must match {vector_name}: q = {vector.shape[0]}; "
                             f"got {jacobian.shape[2]}")
    arrays = [a for a in (samples, vector, jacobian) if a is not None]
    out = _backend.result_float_dtype(XP, *(np.empty(0, dtype=a.dtype) for a in arrays))
    return Inputs(samples, jacobian, vector, vector_name, out, _backend.work_dtype(XP, out))

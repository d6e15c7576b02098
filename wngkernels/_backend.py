"""The one door to ``array_api_compat``: namespaces, dtypes, devices and input checks.

Every public entry point of the core calls :func:`namespace` once and passes the
namespace ``xp`` down; nothing else in the package imports ``array_api_compat``.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
from array_api_compat import device as device  # re-exported: the one door

__all__ = [
    "as_float_matrix",
    "check_positive_scalar",
    "common_device",
    "device",
    "float_pair",
    "in_namespace",
    "namespace",
    "require_finite",
    "result_float_dtype",
]


def _library(x: Any) -> str:
    """Top-level module name of the library an array comes from (for messages)."""
    return type(x).__module__.split(".")[0]


def namespace(*arrays: Any, names: tuple[str, ...] | None = None):
    """Return the array-API namespace shared by ``arrays``.

    Parameters
    ----------
    *arrays : array
        Arrays from one library (``None`` entries are ignored).
    names : tuple of str, optional
        Argument names, used in error messages.

    Raises
    ------
    TypeError
        If an argument is not an array, or the arrays come from different libraries.
    """
    names = names or tuple(f"argument {i}" for i in range(len(arrays)))
    present = [(n, a) for n, a in zip(names, arrays, strict=False) if a is not None]
    for name, a in present:
        if not array_api_compat.is_array_api_obj(a):
            raise TypeError(
                f"{name} must be an array (NumPy, CuPy, PyTorch or another array-API "
                f"library); got {type(a).__name__}"
            )
    libraries = {_library(a) for _, a in present}
    if len(libraries) > 1:
        seen = ", ".join(f"{n}: {_library(a)}" for n, a in present)
        raise TypeError(f"arrays from different libraries cannot be mixed ({seen})")
    try:
        return array_api_compat.array_namespace(*(a for _, a in present))
    except TypeError as exc:  # e.g. two array_api_strict namespaces of different versions
        raise TypeError(f"arrays do not share one namespace: {exc}") from None


def in_namespace(obj: Any, xp) -> bool:
    """Whether ``obj`` is an array of the namespace ``xp``."""
    try:
        return namespace(obj) is xp
    except TypeError:
        return False


def common_device(xp, *arrays: Any, names: tuple[str, ...] | None = None):
    """Return the device shared by ``arrays``; ``ValueError`` if they are on different ones."""
    names = names or tuple(f"argument {i}" for i in range(len(arrays)))
    present = [(n, a) for n, a in zip(names, arrays, strict=False) if a is not None]
    devices = [device(a) for _, a in present]
    if any(dv != devices[0] for dv in devices[1:]):
        seen = ", ".join(f"{n}: {dv}" for (n, _), dv in zip(present, devices, strict=False))
        raise ValueError(f"arrays must be on one device ({seen})")
    return devices[0]


def result_float_dtype(xp, *arrays: Any):
    """Floating dtype of a computation on ``arrays``.

    Real floating inputs keep their dtype (the widest one wins); integer and boolean
    inputs promote to the namespace's default floating dtype. Complex input is refused.
    """
    dtypes = []
    for a in arrays:
        if xp.isdtype(a.dtype, "complex floating"):
            raise TypeError(f"complex arrays are not supported; got dtype {a.dtype}")
        if xp.isdtype(a.dtype, "real floating"):
            dtypes.append(a.dtype)
    if not dtypes:
        return xp.empty(0).dtype  # the library's default float
    return xp.result_type(*dtypes)


def require_finite(xp, x: Any, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or Inf (one reduction, one scalar read)."""
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name} must be finite; it contains NaN or Inf")


def as_float_matrix(xp, x: Any, name: str, dtype=None, check_finite: bool = True):
    """Validate a 2-D ``(n, d)`` array and return it in a floating dtype.

    Parameters
    ----------
    xp : namespace
    x : array, shape (n, d)
    name : str
        Argument name for error messages.
    dtype : dtype, optional
        Target floating dtype; default: :func:`result_float_dtype` of ``x``.
    check_finite : bool
        Refuse NaN and Inf.
    """
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d); got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty; got shape {tuple(x.shape)}")
    dtype = result_float_dtype(xp, x) if dtype is None else dtype
    if x.dtype != dtype:
        x = xp.astype(x, dtype)
    if check_finite:
        require_finite(xp, x, name)
    return x


def check_positive_scalar(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float, refusing non-numbers (strings and bools too), non-finite
    values and values ``<= 0`` (``< 0`` with ``allow_zero``)."""
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number; got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}; got {value!r}")
    return v


def float_pair(x, y, names: tuple[str, str] = ("x", "y")):
    """Validate ``(n, d)`` and ``(m, d)`` arrays of one library and device.

    Returns ``xp`` and both arrays in one floating dtype (:func:`result_float_dtype`).
    """
    xp = namespace(x, y, names=names)
    common_device(xp, x, y, names=names)
    dtype = result_float_dtype(xp, x, y)
    x = as_float_matrix(xp, x, names[0], dtype)
    y = as_float_matrix(xp, y, names[1], dtype)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same number of features d; "
            f"got {x.shape[1]} and {y.shape[1]}"
        )
    return xp, x, y

"""The one door to ``array_api_compat``, and the one home of input validation.

Every public entry point of the core calls :func:`namespace` once and passes the
namespace ``xp`` down; nothing else in the package imports ``array_api_compat``.

The generic rules live here, once, for the core and the PyTorch edge alike:

- a wrong *type* (a string, a bool, a float where an integer is counted, a non-array) is a
  ``TypeError``; a wrong *value* (out of range, NaN or Inf, a wrong shape) is a ``ValueError``;
- every message names the argument and says what was expected.

Scalars: :func:`check_positive_scalar`, :func:`check_real`, :func:`check_int`,
:func:`check_choice`. Arrays: :func:`namespace`, :func:`common_device`, :func:`as_float_matrix`,
:func:`check_shape`, :func:`require_finite`. Dtypes: :func:`result_float_dtype`,
:func:`work_dtype`.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import array_api_compat
import numpy as np
from array_api_compat import device as device  # re-exported: the one door

__all__ = [
    "as_float_matrix",
    "check_choice",
    "check_int",
    "check_positive_scalar",
    "check_real",
    "check_shape",
    "common_device",
    "device",
    "float_pair",
    "ignore_overflow",
    "in_namespace",
    "max_abs",
    "namespace",
    "require_finite",
    "result_float_dtype",
    "work_dtype",
]


def _library(x: Any) -> str:
    """Name of the library an array comes from (for messages): the top-level package of its
    array-API namespace (``numpy``, ``torch``, ``cupy``, ``jax``...), so that every array type of
    one library counts as that library (JAX's concrete arrays live in ``jaxlib``, its tracers
    under ``jax``; both have the namespace ``jax.numpy``)."""
    try:
        name = array_api_compat.array_namespace(x).__name__
    except TypeError:
        name = type(x).__module__
    return name.removeprefix("array_api_compat.").split(".")[0]


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
        If an argument is not an array, is a Dask array (:mod:`wngkernels.dask` takes those), or
        the arrays come from different libraries.
    """
    names = names or tuple(f"argument {i}" for i in range(len(arrays)))
    present = [(n, a) for n, a in zip(names, arrays, strict=False) if a is not None]
    for name, a in present:
        if array_api_compat.is_dask_array(a):  # lazy and chunked: the core's host reads would compute it
            raise TypeError(
                f"{name} is a Dask array, which the core does not take (it computes in memory): use "
                "wngkernels.dask (kwng_direction, cc_gram, t_matrix, metric_apply), which keeps the long "
                "axis N chunked and computes the sums over it once per call"
            )
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


def _is_bool(value: Any) -> bool:
    """Python and NumPy booleans, and boolean 0-d arrays of any library."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is not None and str(dtype).rsplit(".", 1)[-1] in ("bool", "bool_")


def _scalar_type_error(value: Any, name: str, what: str) -> TypeError:
    return TypeError(f"{name} must be {what}; got {value!r} of type {type(value).__name__}")


def check_real(value: Any, name: str) -> float:
    """Return ``value`` as a finite Python float.

    Parameters
    ----------
    value : real number
        A Python or NumPy number, or a 0-d array of any library (read to the host).
    name : str
        The argument's name, for messages.

    Returns
    -------
    float

    Raises
    ------
    TypeError
        If ``value`` is not a real number: a string, bytes, a bool, ``None``, a complex number,
        an array with one or more axes.
    ValueError
        If ``value`` is NaN or infinite.
    """
    if isinstance(value, (str, bytes)) or _is_bool(value) or getattr(value, "ndim", 0) != 0:
        raise _scalar_type_error(value, name, "a real number")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise _scalar_type_error(value, name, "a real number") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    return v


def check_positive_scalar(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a finite Python float ``> 0`` (``>= 0`` with ``allow_zero``).

    Parameters
    ----------
    value : real number
        As in :func:`check_real`.
    name : str
        The argument's name, for messages.
    allow_zero : bool
        Accept ``0``.

    Returns
    -------
    float

    Raises
    ------
    TypeError
        If ``value`` is not a real number (see :func:`check_real`).
    ValueError
        If ``value`` is NaN, infinite, negative, or zero without ``allow_zero``; the message
        reads ``"<name> must be a finite number > 0; got <value>"`` (``>= 0``).
    """
    try:
        v = check_real(value, name)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}; got {value!r}")
    return v


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return the integer count ``value`` as a Python int, within ``[minimum, maximum]``.

    Parameters
    ----------
    value : int
        A Python or NumPy integer, or an integer 0-d array of any library. Floats (even
        ``2.0``), strings and bools are refused.
    name : str
        The argument's name, for messages.
    minimum, maximum : int, optional
        Inclusive bounds.

    Returns
    -------
    int

    Raises
    ------
    TypeError
        If ``value`` is not an integer (``"<name> must be an int; got ..."``).
    ValueError
        If ``value`` is out of range (``"<name> must be an int >= <minimum>; got ..."``, or
        ``<= maximum``, or ``in [minimum, maximum]``).
    """
    if _is_bool(value) or isinstance(value, (str, bytes)):
        raise _scalar_type_error(value, name, "an int")
    try:
        v = operator.index(value)
    except TypeError:
        raise _scalar_type_error(value, name, "an int") from None
    low = minimum is not None and v < minimum
    high = maximum is not None and v > maximum
    if low or high:
        if minimum is not None and maximum is not None:
            raise ValueError(f"{name} must be an int in [{minimum}, {maximum}]; got {v}")
        bound = f">= {minimum}" if low else f"<= {maximum}"
        raise ValueError(f"{name} must be an int {bound}; got {v}")
    return int(v)


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of the strings ``choices``.

    Raises
    ------
    TypeError
        If ``value`` is not a string.
    ValueError
        If it is a string not in ``choices``.
    """
    listed = ", ".join(map(repr, choices))
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {listed}; got {value!r} of type {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {listed}; got {value!r}")
    return value


def check_shape(x: Any, name: str, shape: tuple[int | None, ...], labels: str | None = None) -> None:
    """Raise ``ValueError`` unless the array ``x`` has ``shape`` (``None`` entries match any length).

    Parameters
    ----------
    x : array
    name : str
        The argument's name, for messages.
    shape : tuple of int or None
    labels : str, optional
        The axes' names, e.g. ``"(N, d, q)"``; the message then reads
        ``"<name> must have shape (N, d, q) = (40, 3, q); got ..."``.
    """
    got = tuple(x.shape)
    if len(got) == len(shape) and all(want is None or g == want for g, want in zip(got, shape, strict=True)):
        return
    names = labels.strip("()").split(", ") if labels else ["?"] * len(shape)
    want = "(" + ", ".join(n if w is None else str(w) for n, w in zip(names, shape, strict=False)) + \
        ("," if len(shape) == 1 else "") + ")"
    prefix = f"{labels} = " if labels else ""
    raise ValueError(f"{name} must have shape {prefix}{want}; got {got}")


def work_dtype(xp, dtype):
    """The dtype a computation on ``dtype`` runs in: ``float32`` for half precision
    (``float16``, ``bfloat16``: linear algebra is not offered, and their range is too short for
    the intermediate products), otherwise ``dtype`` itself. Results are cast back."""
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype


def ignore_overflow():
    """A context in which an over- or underflow (or a division by an ``eps`` that rounds to 0 in
    the dtype) that the caller handles raises no ``RuntimeWarning``.

    For arithmetic whose overflow to ``inf`` is the intended limit (a point out of the kernel's
    reach, an eigenvalue beyond the dtype) or is detected and refused right after. It silences
    NumPy (and the libraries built on it, such as array_api_strict); others do not warn.
    """
    return np.errstate(all="ignore")


def max_abs(xp, *arrays: Any) -> float:
    """``max |x|`` over every ``x`` of ``arrays`` as a Python float (one scalar read); ``0.0`` if
    all are empty.

    NaN anywhere gives NaN, Inf gives Inf: a finiteness check comes with it. For real floating
    arrays, ``max(max x, −min x)``: two reads of ``x`` and no ``|x|`` written (2.5–3 times faster
    on a GPU than ``max(|x|)``).
    """
    parts = []
    for x in arrays:
        if math.prod(x.shape) == 0:
            continue
        if xp.isdtype(x.dtype, "real floating"):
            parts += [xp.max(x), -xp.min(x)]
        else:
            parts.append(xp.max(xp.abs(x)))
    return float(xp.max(xp.stack(parts))) if parts else 0.0


def pow2_below(value: float) -> float:
    """A power of two ``c`` with ``c <= value < 2c`` (``value > 0`` finite): exact to divide by."""
    return math.ldexp(1.0, math.frexp(value)[1] - 1)


def pow2_below_array(xp, value):
    """:func:`pow2_below` left on the device, reading nothing back: a 0-d ``float64`` array, a power
    of two ``c`` with ``c <= value < 2c`` where the 0-d ``value`` is finite and ``> 0`` (``log2`` may
    round up to an integer next to a power of two: then ``c`` exceeds ``value`` by that rounding, still
    a power of two, which is all that dividing by it exactly needs), and ``1`` where ``value`` is 0,
    NaN or Inf. ``c`` stays below 2¹⁰²⁴ (finite)."""
    v = xp.astype(value, xp.float64)
    k = xp.floor(xp.log2(xp.where(xp.isfinite(v) & (v > 0), v, 1.0)))
    # where, not minimum: array-api-compat turns minimum's Python scalar into a tensor copied from
    # the host, which waits for the device
    return 2.0 ** xp.where(k > 1023.0, 1023.0, k)


def float_pair(x, y, names: tuple[str, str] = ("x", "y"), check_finite: bool = True):
    """Validate ``(n, d)`` and ``(m, d)`` arrays of one library and device.

    Returns ``xp`` and both arrays in one floating dtype (:func:`result_float_dtype`). With
    ``check_finite=False`` the caller checks finiteness itself (e.g. in a read it makes anyway).
    """
    xp = namespace(x, y, names=names)
    common_device(xp, x, y, names=names)
    dtype = result_float_dtype(xp, x, y)
    x = as_float_matrix(xp, x, names[0], dtype, check_finite)
    y = as_float_matrix(xp, y, names[1], dtype, check_finite)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same number of features d; "
            f"got {x.shape[1]} and {y.shape[1]}"
        )
    return xp, x, y

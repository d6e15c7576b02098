import subprocess
import sys

import numpy as np
import pytest

from wngkernels import _backend


def test_import_does_not_import_torch_cupy_or_jax():
    code = "import sys, wngkernels; print(*(m in sys.modules for m in ('torch', 'cupy', 'jax')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


def test_mixed_libraries_raise_type_error_naming_arguments():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"different libraries.*x: numpy.*y: torch"):
        _backend.namespace(np.zeros((2, 2)), torch.zeros(2, 2), names=("x", "y"))


def test_non_array_raises_type_error():
    with pytest.raises(TypeError, match="x must be an array"):
        _backend.namespace([[1.0, 2.0]], names=("x",))


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(np.float32, np.float32), (np.float64, np.float64), (np.int32, np.float64), (np.bool_, np.float64)],
)
def test_result_float_dtype_numpy(dtype, expected):
    xp = _backend.namespace(np.zeros(2, dtype=dtype))
    assert _backend.result_float_dtype(xp, np.zeros(2, dtype=dtype)) == expected


def test_result_float_dtype_torch_integers_promote_to_default_float():
    torch = pytest.importorskip("torch")
    xp = _backend.namespace(torch.zeros(2))
    assert _backend.result_float_dtype(xp, torch.zeros(2, dtype=torch.int64)) == torch.get_default_dtype()
    assert _backend.result_float_dtype(xp, torch.zeros(2, dtype=torch.float32)) == torch.float32


def test_complex_refused():
    xp = _backend.namespace(np.zeros(2))
    with pytest.raises(TypeError, match="complex"):
        _backend.result_float_dtype(xp, np.zeros(2, dtype=complex))


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [(0.0, ValueError, "> 0"), (-1, ValueError, "> 0"), (float("nan"), ValueError, "finite"),
     (float("inf"), ValueError, "finite"), ("a", TypeError, "real number"), (None, TypeError, "real number")],
)
def test_check_positive_scalar(value, exc, match):
    with pytest.raises(exc, match=f"width.*{match}"):
        _backend.check_positive_scalar(value, "width")


def test_as_float_matrix_checks():
    xp = _backend.namespace(np.zeros(2))
    with pytest.raises(ValueError, match=r"x must be 2-D \(n, d\); got shape \(3,\)"):
        _backend.as_float_matrix(xp, np.zeros(3), "x")
    with pytest.raises(ValueError, match="x must be non-empty"):
        _backend.as_float_matrix(xp, np.zeros((0, 2)), "x")
    with pytest.raises(ValueError, match="x must be finite"):
        _backend.as_float_matrix(xp, np.array([[0.0, np.nan]]), "x")
    out = _backend.as_float_matrix(xp, np.ones((2, 2), dtype=np.int64), "x")
    assert out.dtype == np.float64


def test_mixed_devices_raise_value_error_naming_arguments():
    xs = pytest.importorskip("array_api_strict")
    import wngkernels as wk

    cpu, other = xs.__array_namespace_info__().devices()[:2]
    x = xs.asarray([[0.0, 1.0], [1.0, 0.0]], device=cpu)
    y = xs.asarray([[1.0, 1.0]], device=other)
    with pytest.raises(ValueError, match=r"arrays must be on one device \(x: .*, y: .*\)"):
        wk.Gaussian(1.0).cross_hessian(x, y)
    with pytest.raises(ValueError, match=r"arrays must be on one device \(samples: .*, grad: .*\)"):
        wk.kwng_direction(xs.asarray([1.0, 2.0], device=other), x, kernel=wk.Gaussian(1.0),
                          basis=wk.NystromBasis([0], [1]), eps=1e-3,
                          jacobian=xs.asarray([[[1.0, 0.0]] * 2] * 2, device=cpu))


def test_max_abs_over_several_arrays_in_one_read(backend):
    """The largest |entry| of all arrays (a negative one included), 0 for empty ones, NaN and Inf
    propagated: the finiteness check the callers rely on; integers take the |x| path."""
    xp = backend.xp
    a, b = backend.asarray([[1.0, -7.5], [2.0, 3.0]]), backend.asarray([[0.5], [-0.25]])
    empty = backend.asarray(np.zeros((0, 3)))
    assert _backend.max_abs(xp, a, b) == 7.5 and _backend.max_abs(xp, b) == 0.5
    assert _backend.max_abs(xp, b, empty) == 0.5 and _backend.max_abs(xp, empty) == 0.0
    assert np.isnan(_backend.max_abs(xp, a, backend.asarray([[np.nan]])))
    assert _backend.max_abs(xp, backend.asarray([[-np.inf]]), b) == np.inf
    assert _backend.max_abs(xp, xp.asarray([-9, 4])) == 9


@pytest.mark.parametrize("value", [1.0, 3.0, 0.75, 1e-300, 5e300])
def test_pow2_below_brackets_the_value(value):
    c = _backend.pow2_below(value)
    assert c <= value < 2 * c and np.log2(c) == int(np.log2(c))


def test_pow2_below_array_is_the_host_rule_on_the_device(backend):
    """The device form of ``pow2_below``: a power of two (dividing by it is exact) within a factor 2
    of values across the dtype's range (subnormals, near-powers of two and the largest number
    included), the host rule's own except where ``log2`` rounds up next to a power of two (then at
    most a rounding above the value), and 1 where the value is 0, NaN or Inf."""
    xp = backend.xp
    info = np.finfo(np.float64 if backend.is_float64 else np.float32)
    values = [1.0, 3.0, 0.75, 2.0 * (1 - info.eps), float(info.smallest_normal) / 8, float(info.max),
              float(info.smallest_normal), 0.75 * float(info.max)]
    flushed = float(backend.to_numpy(backend.asarray(values[4]) * 1.0)) == 0  # XLA's CPU flushes subnormals
    for v in values[:4] + values[5:] if flushed else values:
        v = float(backend.to_numpy(backend.asarray(v)))  # as the dtype holds it
        got = float(backend.to_numpy(_backend.pow2_below_array(xp, backend.asarray(v))))
        assert got in (_backend.pow2_below(v), 2 * _backend.pow2_below(v)), v
        assert np.log2(got) == int(np.log2(got)) and v / 2 < got <= v * (1 + 4 * float(info.eps)), v
    for v in (0.0, np.nan, np.inf, -np.inf):
        assert float(backend.to_numpy(_backend.pow2_below_array(xp, backend.asarray(v)))) == 1.0

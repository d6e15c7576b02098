"""Shared fixtures: the backend × dtype matrix, a strict comparison, hypothesis profiles."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

try:
    import jax

    # JAX computes in float32 unless x64 is on: without this, float64 inputs would be silently
    # narrowed (jnp.asarray(..., dtype=float64) gives float32) and the float64 entries of the
    # backend matrix would test float32. It must be set before any JAX array is created, so
    # it is done here, at import, once for the whole session.
    jax.config.update("jax_enable_x64", True)
    # The matrix's JAX entry is JAX on the CPU (the scope; JAX on a GPU is not tested).
    # On a machine with a CUDA jaxlib, JAX would put every new array on the GPU by default, so
    # the CPU is made the only platform, before any backend starts.
    jax.config.update("jax_platforms", "cpu")
except ImportError:  # the JAX entries of the matrix are skipped
    jax = None

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass(frozen=True)
class Backend:
    """One array library on one device in one floating dtype, as the tests see it."""

    name: str
    xp: Any
    dtype: Any
    device: Any
    to_numpy: Callable[[Any], np.ndarray]

    @property
    def is_float64(self) -> bool:
        return np.dtype(self.to_numpy(self.xp.zeros(1, dtype=self.dtype)).dtype) == np.float64

    @property
    def rtol(self) -> float:
        """SciPy's default: 4·sqrt(eps) of the dtype."""
        return 4 * float(np.sqrt(np.finfo(np.float64 if self.is_float64 else np.float32).eps))

    def asarray(self, a):
        return self.xp.asarray(np.asarray(a, dtype=np.float64), dtype=self.dtype, device=self.device)

    def assert_close(self, actual, desired, rtol=None, atol=0.0):
        """Same namespace, dtype, device and shape as this backend; then values."""
        from array_api_compat import array_namespace, device

        assert array_namespace(actual) is self.xp, f"namespace {type(actual)} is not {self.name}"
        assert actual.dtype == self.dtype, f"dtype {actual.dtype} != {self.dtype}"
        assert device(actual) == self.device, f"device {device(actual)} != {self.device}"
        desired = np.asarray(desired)
        assert tuple(actual.shape) == desired.shape, f"shape {tuple(actual.shape)} != {desired.shape}"
        np.testing.assert_allclose(
            self.to_numpy(actual), desired, rtol=self.rtol if rtol is None else rtol, atol=atol
        )


def _backends():
    import array_api_compat.numpy as xnp

    found = [("numpy", xnp, None, lambda a: np.asarray(a), None)]
    try:
        import array_api_strict as xs

        found.append(("array_api_strict", xs, None, lambda a: np.from_dlpack(a), None))
    except ImportError:
        found.append(("array_api_strict", None, None, None, "array_api_strict not installed"))
    try:
        import array_api_compat.torch as xt
        import torch

        found.append(("torch-cpu", xt, torch.device("cpu"), lambda a: a.detach().cpu().numpy(), None))
        reason = None if torch.cuda.is_available() else "no CUDA device"
        found.append(
            ("torch-cuda", xt, torch.device("cuda") if reason is None else None,
             lambda a: a.detach().cpu().numpy(), reason)
        )
    except ImportError:
        found.append(("torch-cpu", None, None, None, "torch not installed"))
    try:
        import array_api_compat.cupy as xc
        import cupy

        reason = None if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA device"
        found.append(("cupy", xc, None, lambda a: cupy.asnumpy(a), reason))
    except Exception:  # noqa: BLE001 - cupy import fails in many ways without a GPU
        found.append(("cupy", None, None, None, "cupy not installed or no GPU"))
    if jax is not None:
        import jax.numpy as jnp  # array_api_compat.array_namespace maps JAX arrays to jax.numpy

        found.append(("jax-cpu", jnp, jax.devices("cpu")[0], lambda a: np.asarray(a), None))
    else:
        found.append(("jax-cpu", None, None, None, "jax not installed"))
    return found


def _params():
    out = []
    for name, xp, dev, to_np, reason in _backends():
        for dt in ("float32", "float64"):
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            out.append(pytest.param((name, xp, dev, to_np, dt), id=f"{name}-{dt}", marks=marks))
    return out


@pytest.fixture(params=_params())
def backend(request) -> Backend:
    """Every installed backend (skipping the others) in float32 and float64."""
    name, xp, dev, to_np, dt = request.param
    from array_api_compat import device as _device

    dev = _device(xp.asarray(0.0) if dev is None else xp.asarray(0.0, device=dev))
    return Backend(name, xp, getattr(xp, dt), dev, to_np)

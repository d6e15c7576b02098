"""Array construction, synchronisation and GPU memory readings, one object per backend.

``get(name)`` returns a :class:`Backend` or raises ``NotImplementedError`` with the reason the
backend cannot run here (library missing, no GPU): asv marks a benchmark whose ``setup`` raises
``NotImplementedError`` as skipped, and ``run_table`` prints the reason.

Arrays are built on the host with NumPy (one seeded generator, so every backend sees the same
numbers) and moved once to the backend's device; timed code never crosses the host boundary.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

#: Every backend the suite knows, in the order tables list them (NumPy first: the reference).
BACKENDS = ("numpy", "array_api_strict", "torch-cpu", "torch-cuda", "cupy", "jax-cpu")

#: Backends that run on a GPU: their timed functions synchronise the device before returning.
GPU_BACKENDS = ("torch-cuda", "cupy")


class Backend:
    """One array library on one device.

    Attributes
    ----------
    name : str
        One of :data:`BACKENDS`.
    xp : module
        The library users call (``numpy``, ``array_api_strict``, ``torch``, ``cupy``, ``jax.numpy``).
    device : object or None
        The device arrays are placed on (``None``: the library's default).
    """

    def __init__(self, name: str, xp: Any, device: Any = None):
        self.name = name
        self.xp = xp
        self.device = device

    @property
    def is_gpu(self) -> bool:
        return self.name in GPU_BACKENDS

    @property
    def needs_warmup(self) -> bool:
        """GPUs (CUDA context, handles, allocator) and JAX (it compiles each operation per shape)."""
        return self.is_gpu or self.name == "jax-cpu"

    def wait(self, result) -> None:
        """Return once ``result`` is computed: JAX dispatches asynchronously even on the CPU, GPUs
        queue kernels; a timed call ends here."""
        if self.name == "jax-cpu":
            import jax

            jax.block_until_ready(result)
        else:
            self.sync()

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    def dtype(self, name: str):
        """The library's dtype called ``name`` (``"float64"`` or ``"float32"``)."""
        return getattr(self.xp, name)

    def asarray(self, a, dtype: str | None = "float64"):
        """Move the NumPy array ``a`` to this backend, cast to ``dtype`` (``None``: keep it)."""
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(dtype, copy=False)
        if self.name == "numpy":
            return a
        if self.name == "array_api_strict":
            return self.xp.asarray(a)
        if self.name.startswith("torch"):
            return self.xp.asarray(a, device=self.device)
        return self.xp.asarray(a)  # cupy, jax.numpy

    def to_numpy(self, a) -> np.ndarray:
        if self.name == "numpy":
            return np.asarray(a)
        if self.name == "array_api_strict":
            return np.from_dlpack(a)
        if self.name.startswith("torch"):
            return a.detach().cpu().numpy()
        if self.name == "jax-cpu":
            return np.asarray(a)
        return self.xp.asnumpy(a)

    def sync(self) -> None:
        """Wait until the device has finished all queued work (no-op on the host)."""
        if self.name == "torch-cuda":
            self.xp.cuda.synchronize()
        elif self.name == "cupy":
            self.xp.cuda.Device().synchronize()

    def reset_peak_memory(self) -> None:
        """Start a new GPU peak-memory reading (no-op on the host)."""
        if self.name == "torch-cuda":
            self.sync()
            self.xp.cuda.reset_peak_memory_stats()
        elif self.name == "cupy":
            self.sync()
            self.xp.get_default_memory_pool().free_all_blocks()

    def peak_memory(self) -> int | None:
        """Bytes of GPU memory held at the peak since :meth:`reset_peak_memory`; ``None`` on the host.

        torch: ``torch.cuda.max_memory_allocated()``. CuPy: the default memory pool's
        ``total_bytes()``; the pool keeps freed blocks, so after a computation it holds its
        high-water mark (up to the pool's rounding and fragmentation).
        """
        if self.name == "torch-cuda":
            self.sync()
            return int(self.xp.cuda.max_memory_allocated())
        if self.name == "cupy":
            self.sync()
            return int(self.xp.get_default_memory_pool().total_bytes())
        return None


@functools.cache
def _load(name: str) -> Backend | str:
    """The backend, or the reason it is unavailable (cached: imports happen once)."""
    if name == "numpy":
        return Backend(name, np)
    if name == "array_api_strict":
        try:
            import array_api_strict
        except ImportError:
            return "array_api_strict is not installed"
        return Backend(name, array_api_strict)
    if name in ("torch-cpu", "torch-cuda"):
        try:
            import torch
        except ImportError:
            return "torch is not installed"
        if name == "torch-cpu":
            return Backend(name, torch, torch.device("cpu"))
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return Backend(name, torch, torch.device("cuda"))
    if name == "cupy":
        try:
            import cupy
        except ImportError:
            return "cupy is not installed"
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                return "cupy sees no CUDA device"
        except Exception as exc:  # CUDARuntimeError without a driver
            return f"cupy cannot reach a CUDA device ({type(exc).__name__})"
        return Backend(name, cupy)
    if name == "jax-cpu":
        try:
            import jax
        except ImportError:
            return "jax is not installed"
        jax.config.update("jax_enable_x64", True)  # float64 cases stay float64
        return Backend(name, jax.numpy, jax.devices("cpu")[0])
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def get(name: str) -> Backend:
    """The backend called ``name``; ``NotImplementedError`` (asv's skip) if it cannot run here."""
    found = _load(name)
    if isinstance(found, str):
        raise NotImplementedError(f"{name}: {found}")
    return found


def unavailable_reason(name: str) -> str | None:
    """Why ``name`` cannot run here, or ``None`` if it can."""
    found = _load(name)
    return found if isinstance(found, str) else None


def available(names=BACKENDS) -> list[str]:
    """The backends among ``names`` that can run here, in order."""
    return [n for n in names if unavailable_reason(n) is None]

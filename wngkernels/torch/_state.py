"""KWNG's records: the basis draws' source, a step's pending sums, the reduction-ratio memory,
the refresh cache and a step's reduced statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..kernels import Kernel
from ..solve import WhitenedSolver


class _Draws:
    """Where the basis draws come from: torch's default CPU generator (``None``), a
    ``torch.Generator``, or a NumPy generator (or a seed for one)."""

    def __init__(self, generator):
        if generator is None or isinstance(generator, (torch.Generator, np.random.Generator)):
            self.source = generator
        elif isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
            self.source = np.random.default_rng(int(generator))
        else:
            raise TypeError("generator must be None, an int seed, a numpy.random.Generator or a "
                            f"torch.Generator; got {type(generator).__name__}")

    def rng(self) -> np.random.Generator:
        """A NumPy generator for one basis draw (:func:`~wngkernels.nystrom_basis`)."""
        if isinstance(self.source, np.random.Generator):
            return self.source
        dev = "cpu" if self.source is None else self.source.device
        seed = torch.randint(0, 2**63 - 1, (), generator=self.source, device=dev)
        return np.random.default_rng(int(seed))

    def get_state(self):
        """``None`` (torch's default generator: the caller's to save), a ``torch.Generator``'s state
        tensor, or a NumPy bit generator's state with its arrays as lists (any bit generator, and
        ``torch.load(..., weights_only=True)`` reads it)."""
        if isinstance(self.source, np.random.Generator):
            return _plain(self.source.bit_generator.state)
        return None if self.source is None else self.source.get_state()

    def restored(self, state):
        """The source :meth:`get_state`'s output describes, built apart from this one (so a bad
        state changes nothing); ``ValueError`` if it is not such an output. A checkpoint's kind of
        source wins over this one's; a ``torch.Generator`` keeps its device."""
        if state is None:
            return None
        try:
            if isinstance(state, torch.Tensor):
                dev = self.source.device if isinstance(self.source, torch.Generator) else "cpu"
                gen = torch.Generator(device=dev)
                gen.set_state(state)
                return gen
            bits = getattr(np.random, str(state["bit_generator"]))()
            if not isinstance(bits, np.random.BitGenerator):
                raise TypeError(state["bit_generator"])
            bits.state = _arrays(state)
            return np.random.Generator(bits)
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
            raise ValueError(f"state['rng'] is not a generator state saved by KWNG.state_dict() ({exc!r})"
                             ) from None

    def adopt(self, source) -> None:
        """Take :meth:`restored`'s result; a generator of the same kind is set in place (it may be
        the caller's)."""
        if isinstance(source, torch.Generator) and isinstance(self.source, torch.Generator):
            self.source.set_state(source.get_state())
        elif (isinstance(source, np.random.Generator) and isinstance(self.source, np.random.Generator)
              and type(source.bit_generator) is type(self.source.bit_generator)):
            self.source.bit_generator.state = source.bit_generator.state
        else:
            self.source = source

    def set_state(self, state) -> None:
        """Restore :meth:`get_state`'s output."""
        self.adopt(self.restored(state))


def _plain(state):
    """A bit generator's state with NumPy arrays as ``{"array": list, "dtype": str}``."""
    if isinstance(state, dict):
        return {k: _plain(v) for k, v in state.items()}
    if isinstance(state, np.ndarray):
        return {"array": state.tolist(), "dtype": str(state.dtype)}
    return state


def _arrays(state):
    """:func:`_plain`'s inverse (states saved before it, with arrays left in, pass unchanged)."""
    if isinstance(state, dict):
        if set(state) == {"array", "dtype"}:
            return np.asarray(state["array"], dtype=state["dtype"])
        return {k: _arrays(v) for k, v in state.items()}
    return state


@dataclass
class _Pending:
    """What ``capture`` gathered since the last ``step``: local, unnormalised sums."""

    rng_state: object
    refresh: bool
    active: tuple[int, ...]
    count: int = 0
    n: int = 0
    loss_sum: torch.Tensor | float = 0.0  # a float64 tensor once a loss is seen: read with the step's stats
    loss_count: int = 0
    bad: bool = False  # T or C Cᵀ could not be formed (non-finite outputs, degenerate bandwidth)
    points: torch.Tensor | None = None  # (M, d)
    dims: torch.Tensor | None = None  # (M,)
    onehot: torch.Tensor | None = None  # (M, d): E[m, dims[m]] = 1, in the work dtype
    kernel: Kernel | None = None  # bandwidth resolved, unless ell holds it
    ell: torch.Tensor | None = None  # the bandwidth left on the device (0-d float64; NaN: unusable)
    cc: torch.Tensor | None = None  # Σ_n H_n H_nᵀ (M, M)
    cc64: torch.Tensor | None = None  # the same in float64 (sync_free: the Cholesky whitening's input)
    t: torch.Tensor | None = None  # factor · Σ_n Σ_i H_n[:, i] ∇θ X_{n,i}  (M, q), from the first backward
    factor: float = 1.0  # the cotangents' scale (loss scale / first micro-batch's N), undone in the whitening
    whitened: bool = False  # the cotangents were whitened: t holds T̃ (M, q) itself

    def resolved_kernel(self) -> Kernel | None:
        """The kernel with a float bandwidth (:func:`with_device_bandwidth` where ``ell`` holds it)."""
        return self.kernel if self.ell is None else with_device_bandwidth(self.kernel, self.ell)


def with_device_bandwidth(kernel: Kernel, ell: torch.Tensor) -> Kernel | None:
    """``kernel`` with the bandwidth ``ell`` left on the device, read (one scalar); ``None`` where it
    is unusable (NaN: :meth:`~wngkernels.AuthorsRule.deferred`)."""
    value = float(ell)
    return kernel.with_bandwidth(value) if math.isfinite(value) else None


@dataclass
class _Ratio:
    r"""The reduction-ratio rule's memory: :math:`r = 2(L_{prev} - L_{now})/(lr\,\langle g_{prev},
    w_{prev}\rangle)` and its running maximum over a window."""

    prev_loss: float | None = None
    prev_gw: float | None = None
    prev_lr: float | None = None
    r_max: float = -math.inf
    count: int = 0

    def record(self, loss: float | None, gw: float, lr: float | None) -> None:
        """What the next ratio compares with: this step's loss, ``⟨g, w⟩`` and learning rate."""
        self.prev_loss, self.prev_gw, self.prev_lr = loss, gw, lr

    def may_close(self, window: int) -> bool:
        """Whether the next :meth:`observe` can end a window (and so move ``ε``)."""
        return (self.prev_loss is not None and (self.prev_gw or 0) > 0 and (self.prev_lr or 0) > 0
                and self.count + 1 >= window)

    def observe(self, loss_now: float, window: int) -> float | None:
        """Add the ratio of ``loss_now``; at the end of a window, its maximum (and a new window)."""
        if self.prev_loss is None or not self.prev_gw or self.prev_gw <= 0:
            return None
        if self.prev_lr is None or self.prev_lr <= 0:
            return None
        r = 2.0 * (self.prev_loss - loss_now) / (self.prev_lr * self.prev_gw)
        if not math.isfinite(r):
            return None
        self.r_max = max(self.r_max, r)
        self.count += 1
        if self.count < window:
            return None
        r_max, self.r_max, self.count = self.r_max, -math.inf, 0
        return r_max

    @staticmethod
    def moved(eps: float, r_max: float, factor: float, bounds: tuple[float, float]) -> float:
        """``ε/factor`` if ``r_max < 0.25`` (too cautious), ``factor·ε`` if ``r_max > 0.75``, else ``ε``;
        kept within ``bounds``."""
        if r_max < 0.25:
            eps = eps / factor
        elif r_max > 0.75:
            eps = eps * factor
        return min(max(eps, bounds[0]), bounds[1])


@dataclass
class _Refresh:
    """What a refresh computed and the steps until the next one reuse."""

    t_white: torch.Tensor  # T̃ (M, q)
    damping: torch.Tensor | None  # the diagonal of D (q,), None for D = I
    active: tuple[int, ...]  # the parameters it was computed for
    step: int
    solver: WhitenedSolver | None = None  # factorised at the first full solve
    s_bound: torch.Tensor | None = None  # max_j ‖T̃_j‖ D_jj^{1/2} >= max |S| (τ's source), or None


class _Reduced(NamedTuple):
    """A step's statistics summed over the process group."""

    cc: torch.Tensor | None
    t: torch.Tensor | None
    t_factor: float  # T holds t_factor · Σ H ∇X
    n: float  # samples
    loss_now: float | None  # the step's loss, where every micro-batch of every rank gave one
    bad: bool  # T or C Cᵀ could not be formed on some rank
    g_bad: bool  # g is non-finite on some rank
    extra: tuple[float, ...] | None = None  # values read with these (reduce_step's extra)

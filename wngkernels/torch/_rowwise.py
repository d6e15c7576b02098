"""BatchNorm's backward once per row inside KWNG's batched backward (a scoped batching rule).

functorch's batching rule for BatchNorm's backward (``BatchRulesNorm.cpp``) folds the rows into
the channels: it copies the cotangent into an ``(N, R·C, …)`` layout, repeats the input, and
computes the weight and bias gradients with separate products and sums. Measured on the seed's
ResNet-18 (H100, ``M = 5``, ``docs/benchmarks.md``), those extra passes cost more GPU time than
the fused kernel itself would for every row: the BatchNorm share of the step's GPU time was
13.7 ms against 8.9 ms for the ``M + 1`` separate passes of the authors' recipe.

:func:`rowwise_batch_norm` replaces that rule, for the duration of a ``with`` block, by one that
runs the operator's own fused kernel once per row and stacks the results with the rows first
(the layout the next convolution's rule reads without a copy). It is registered through
``torch.library.register_vmap`` on a private ``Library`` and removed on exit, so nothing outside
the block sees it. Where this PyTorch cannot register it, the block runs functorch's rule.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

#: The BatchNorm backward operators whose batching rule is replaced (those this build has).
_OPS = ("native_batch_norm_backward", "cudnn_batch_norm_backward", "miopen_batch_norm_backward")


def _ops_for(device_type: str | None) -> tuple[str, ...]:
    """The operators a backward on ``device_type`` can call (each registration costs about 0.4 ms
    of host time; ``None``: all of them). CUDA builds call cuDNN's kernel, ROCm builds MIOpen's,
    and both fall back to the native one (e.g. for inputs cuDNN does not take)."""
    if device_type is None:
        return _OPS
    if device_type != "cuda":
        return _OPS[:1]
    return (_OPS[0], _OPS[2] if getattr(torch.version, "hip", None) else _OPS[1])


def _per_row(op):
    """A batching rule for ``op``: the operator once per row, the results stacked rows first."""

    def rule(info, in_dims, *args):
        rows = [op(*[a.select(d, r) if isinstance(d, int) else a for a, d in zip(args, in_dims, strict=True)])
                for r in range(info.batch_size)]
        outs = tuple(None if rows[0][i] is None else torch.stack([row[i] for row in rows])
                     for i in range(len(rows[0])))
        return outs, tuple(None if o is None else 0 for o in outs)

    return rule


def _register(names: tuple[str, ...]) -> torch.library.Library | None:
    """The per-row rules for the operators ``names`` on a new ``Library`` (``None`` where this
    PyTorch cannot register them)."""
    register = getattr(torch.library, "register_vmap", None)
    if register is None or not hasattr(torch.library.Library, "_destroy"):
        return None  # without a way to remove it, the rule would outlive the block: not registered
    lib = torch.library.Library("aten", "IMPL")  # a private fragment, removed on exit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": the point
            for name in names:
                op = getattr(torch.ops.aten, name, None)
                if op is not None:
                    register(f"aten::{name}", _per_row(op.default), lib=lib)
    except Exception:  # noqa: BLE001 (an optimisation only: any PyTorch that refuses it keeps functorch's rule)
        _remove(lib)
        return None
    return lib


def _remove(lib: torch.library.Library) -> None:
    """Unregister everything ``lib`` registered (functorch's own rules are back)."""
    lib._destroy()


@contextlib.contextmanager
def rowwise_batch_norm(device_type: str | None = None):
    """Within the block, ``vmap`` runs BatchNorm's backward once per row (the fused kernel), for a
    backward on ``device_type`` (``"cpu"``, ``"cuda"``; ``None``: any)."""
    lib = _register(_ops_for(device_type))
    try:
        yield
    finally:
        if lib is not None:
            _remove(lib)

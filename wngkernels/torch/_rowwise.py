"""BatchNorm's backward once per row inside KWNG's batched backward (a scoped batching rule).

functorch's batching rule for BatchNorm's backward (``BatchRulesNorm.cpp``) folds the rows into
the channels: it copies the cotangent into an ``(N, R·C, …)`` layout, repeats the input, and
computes the weight and bias gradients with separate products and sums. Measured on the seed's
ResNet-18 (H100, ``M = 5``, ``docs/benchmarks.md``), those extra passes cost more GPU time than
the fused kernel itself would for every row: the BatchNorm share of the step's GPU time was
13.7 ms against 8.9 ms for the ``M + 1`` separate passes of the authors' recipe.

:func:`rowwise_batch_norm` replaces that rule, for the duration of a ``with`` block, by one that
runs the operator's own fused kernel once per row and stacks the results with the rows first
(the layout the next convolution's rule reads without a copy). It is registered on a private
``Library`` as a kernel of functorch's ``FuncTorchBatched`` key (:func:`_direct`; through
``torch.library.register_vmap`` where functorch's private functions are missing) and removed on
exit, so nothing outside the block sees it. Where this PyTorch cannot register it (no
``register_vmap``: older than 2.4), the block runs functorch's rule.
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


def _stacked_rows(op, size: int, args, dims, kwargs=None):
    """``op`` once per row of the batched ``args`` (``dims[i]``: the row axis of ``args[i]``, ``None``
    if not batched; ``kwargs`` are not batched); its outputs stacked rows first (``None`` stays
    ``None``)."""
    kwargs = kwargs or {}
    rows = [op(*[a.select(d, r) if d is not None else a for a, d in zip(args, dims, strict=True)], **kwargs)
            for r in range(size)]
    return tuple(None if rows[0][i] is None else torch.stack([row[i] for row in rows])
                 for i in range(len(rows[0])))


def _per_row(op):
    """A batching rule for ``op`` in ``torch.library.register_vmap``'s form."""

    def rule(info, in_dims, *args, **kwargs):
        dims = [d if isinstance(d, int) else None for d in in_dims]
        outs = _stacked_rows(op, info.batch_size, args, dims, kwargs)
        return outs, tuple(None if o is None else 0 for o in outs)

    return rule


def _direct(op):
    """The same rule as a kernel of functorch's ``FuncTorchBatched`` dispatch key: the batched
    tensors are unwrapped and the results wrapped here. ``register_vmap`` wraps a rule in a general
    adapter (pytree passes over the arguments and outputs, an identity check of every output) that
    costs more host time than the rule's six cuDNN calls; BatchNorm's backward has plain arguments
    (tensors, ``None``, flags) and fresh outputs, and needs none of it. ``None`` where this PyTorch
    lacks functorch's private functions it uses (then ``register_vmap`` registers the rule)."""
    functorch = getattr(torch._C, "_functorch", None)
    unwrap, wrap = getattr(functorch, "_unwrap_batched", None), getattr(functorch, "_add_batch_dim", None)
    try:
        from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter as current
    except ImportError:
        return None
    if unwrap is None or wrap is None or not hasattr(torch._C, "_ExcludeDispatchKeyGuard"):
        return None
    below = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)

    def kernel(keyset, *args, **kwargs):
        interpreter = current()
        level = interpreter.level()
        pairs = [unwrap(a, level) if isinstance(a, torch.Tensor) else (a, None) for a in args]
        plain, dims = [a for a, _ in pairs], [d for _, d in pairs]
        with torch._C._ExcludeDispatchKeyGuard(below):
            if all(d is None for d in dims):  # nothing batched at this level
                return op(*plain, **kwargs)
            outs = _stacked_rows(op, interpreter.batch_size(), plain, dims, kwargs)
        return tuple(None if o is None else wrap(o, 0, level) for o in outs)

    return kernel


def _register_rule(lib: torch.library.Library, name: str, op) -> None:
    """The per-row rule for ``aten::name`` on ``lib``: as a ``FuncTorchBatched`` kernel (:func:`_direct`)
    or, where that cannot be built, through ``torch.library.register_vmap``."""
    kernel = _direct(op)
    if kernel is not None:
        lib.impl(name, kernel, "FuncTorchBatched", with_keyset=True)
    else:
        torch.library.register_vmap(f"aten::{name}", _per_row(op), lib=lib)


def _register(names: tuple[str, ...]) -> torch.library.Library | None:
    """The per-row rules for the operators ``names`` on a new ``Library`` (``None`` where this
    PyTorch cannot register them)."""
    library = torch.library
    if getattr(library, "register_vmap", None) is None or not hasattr(library.Library, "_destroy"):
        return None  # without a way to remove it, the rule would outlive the block: not registered
    lib = torch.library.Library("aten", "IMPL")  # a private fragment, removed on exit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": the point
            for name in names:
                op = getattr(torch.ops.aten, name, None)
                if op is not None:
                    _register_rule(lib, name, op.default)
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

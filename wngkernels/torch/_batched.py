r"""The model's one entry into KWNG: ``T`` from vector–Jacobian products.

The mathematics page ("The kernelized estimator") defines ``T``.

Row ``m`` of :math:`T` is the VJP of :math:`\theta \mapsto (h_\theta(Z_n))_n` with the cotangent
``A[m] = N⁻¹ ∂_{x_{i_m}} ∂_y k(Y_m, X_n)`` (:func:`wngkernels.cotangents`). All ``M`` rows come
from **one** batched backward (``torch.autograd.grad`` under ``torch.func.vmap``: a ``vmap`` over
the backward graph), not ``M`` passes. Nothing here knows about layers: BatchNorm,
attention, embeddings and shared parameters work because autograd does.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ._rowwise import rowwise_batch_norm

__all__ = ["batched_vjp", "flatten_outputs", "grad_only_through", "jacobian_vjp_rows", "t_matrix_and_grad"]

_MODES = ("auto", "batched", "loop")


def _as_output_list(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)) and outputs and all(isinstance(o, torch.Tensor) for o in outputs):
        return list(outputs)
    raise TypeError(
        "outputs must be a tensor (N, ...) or a non-empty list/tuple of tensors (N, ...); "
        f"got {type(outputs).__name__}"
    )


def flatten_outputs(outputs) -> torch.Tensor:
    """The samples ``X`` ``(N, d)``: each output ``(N, ...)`` flattened per sample, then concatenated.

    Parameters
    ----------
    outputs : Tensor or sequence of Tensor
        Model outputs ``h_θ(Z)``, each of shape ``(N, ...)`` with the same ``N``, still attached
        to the autograd graph. A 1-D output ``(N,)`` counts as ``(N, 1)``.

    Returns
    -------
    Tensor, shape (N, d)
        Still attached to the graph; ``d`` is the sum of the per-sample sizes.

    Raises
    ------
    ValueError
        A 0-d or empty output, outputs with different ``N``, or an output that does not
        require grad (detached, or computed under ``torch.no_grad()``).
    """
    outs = _as_output_list(outputs)
    n = None
    flat = []
    for i, o in enumerate(outs):
        name = "outputs" if len(outs) == 1 else f"outputs[{i}]"
        if o.ndim == 0 or o.shape[0] == 0 or o.numel() == 0:
            raise ValueError(f"{name} must have shape (N, ...) with N >= 1 and d >= 1; got {tuple(o.shape)}")
        if not o.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor; got dtype {o.dtype}")
        if not o.requires_grad:
            raise ValueError(
                f"{name} is not attached to the autograd graph (requires_grad=False): pass the model's "
                "outputs as returned by forward, not detached and not computed under torch.no_grad()"
            )
        if n is None:
            n = o.shape[0]
        elif o.shape[0] != n:
            raise ValueError(
                f"all outputs must share the batch size N = {n}; {name} has shape {tuple(o.shape)}"
            )
        flat.append(o.reshape(n, -1))
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


def _split_cotangents(outs: list[torch.Tensor], cot: torch.Tensor) -> list[torch.Tensor]:
    """Cut cotangents ``(M, N, d)`` into one ``(M, *o.shape)`` piece per output, in its dtype."""
    m = cot.shape[0]
    sizes = [o[0].numel() for o in outs]
    pieces = torch.split(cot, sizes, dim=2)
    return [p.reshape(m, *o.shape).to(o.dtype) for p, o in zip(pieces, outs, strict=True)]


def _rows_from_grads(grads, params, m: int, dtype) -> torch.Tensor:
    cols = []
    for g, p in zip(grads, params, strict=True):
        if g is None:  # parameter not reached from the outputs: its column of T is zero
            cols.append(torch.zeros(m, p.numel(), dtype=dtype, device=p.device))
        else:
            cols.append(g.reshape(m, -1).to(dtype))
    return torch.cat(cols, dim=1)


def grad_only_through(loss: torch.Tensor, outputs, params: Sequence[torch.Tensor], *,
                      every_output: bool = False) -> bool:
    """Whether ``loss.backward()`` would reach only ``params``, and those only through ``outputs``
    (with ``every_output``, also: through each of the outputs).

    Two walks of the autograd graph: from ``loss``, stopping at the outputs' nodes, it must meet
    no leaf (no ``AccumulateGrad`` node: no weight decay, auxiliary head or learned loss weight
    in the loss) (and, with ``every_output``, meet every output's node); from the outputs, every
    leaf it meets must be one of ``params``. Then ``∂loss/∂θ`` is the vector–Jacobian product of
    the outputs with ``∂loss/∂outputs`` and nothing else would receive a gradient.
    """
    outs = _as_output_list(outputs)
    stop = {o.grad_fn for o in outs}
    if loss.grad_fn is None or None in stop:
        return False
    met = set()

    def leaves(starts, stop_at):
        seen, stack, found = set(), list(starts), []
        while stack:
            node = stack.pop()
            if node in stop_at:
                met.add(node)
            if node is None or node in stop_at or node in seen:
                continue
            seen.add(node)
            if hasattr(node, "variable"):  # AccumulateGrad
                found.append(node.variable)
            stack.extend(fn for fn, _ in node.next_functions)
        return found

    if leaves([loss.grad_fn], stop) or (every_output and met != stop):
        return False
    ids = {id(p) for p in params}
    return all(id(v) in ids for v in leaves(stop, set()))


def batched_vjp(outputs, pieces: list[torch.Tensor], params: Sequence[torch.Tensor], *,
                vjp_mode: str = "auto", retain_graph: bool = True) -> tuple[list[torch.Tensor | None], str]:
    """Per-parameter gradients ``(R, *p.shape)`` (``None`` if unreached) of ``R`` cotangent rows,
    and the backward that computed them (``"vmap"``, ``"legacy"`` or ``"loop"``; passing it back as
    ``vjp_mode`` skips the forms that failed).

    ``pieces`` holds one ``(R, *o.shape)`` cotangent per output. One batched backward —
    ``torch.func.vmap`` over ``autograd.grad``, or where that cannot run (an operation functorch
    refuses) the older ``is_grads_batched`` — or, in ``"loop"`` mode or where neither runs
    (``"auto"``, with a warning; e.g. a ``torch.compile``-d model), ``R`` backward passes.
    ``retain_graph=False`` frees the graph after the last pass (in ``"auto"`` mode only once the
    batched pass has succeeded: a failed one must leave the graph to the loop).
    """
    if vjp_mode not in _MODES and vjp_mode not in _BATCHED:  # (a settled "auto" passes what it used)
        raise ValueError(f"vjp_mode must be one of {_MODES}; got {vjp_mode!r}")
    outs = _as_output_list(outputs)
    params = list(params)
    try:
        return _batched_vjp(outs, pieces, params, vjp_mode, retain_graph)
    except RuntimeError as exc:
        if "donated buffer" in str(exc):
            raise RuntimeError(
                "wngkernels: T needs several backward passes through this torch.compile-d graph "
                "(retain_graph=True), which its donated buffers forbid; set "
                "torch._functorch.config.donated_buffer = False before the compiled model's first call"
            ) from exc
        raise


def _vmapped_grads(outs, pieces, params, retain: bool) -> list[torch.Tensor | None]:
    """``torch.autograd.grad`` under ``torch.func.vmap`` over the rows of ``pieces``: one backward.

    functorch's batching rules fold the rows into each layer's work (a convolution's input gradient
    into its batch, its weight gradient into its output channels), where ``is_grads_batched`` (the
    older ``vmap``) runs most layers' backward once per row. BatchNorm's backward runs its fused
    kernel once per row (:func:`~wngkernels.torch._rowwise.rowwise_batch_norm`: cheaper than
    functorch's rule for it). Operations without a rule still run, row by row (functorch's
    fallback, whose performance warning is silenced here); an operation that cannot run under
    ``vmap`` raises.
    """
    reached: list[bool] = []

    def one(*rows):
        grads = torch.autograd.grad(outs, params, grad_outputs=list(rows), allow_unused=True,
                                    retain_graph=retain)
        reached[:] = [g is not None for g in grads]
        return tuple(g for g in grads if g is not None)  # vmap returns tensors only

    with warnings.catch_warnings(), rowwise_batch_norm(outs[0].device.type):
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        got = iter(torch.func.vmap(one)(*pieces))
    return [next(got) if r else None for r in reached]


def _legacy_grads(outs, pieces, params, retain: bool) -> list[torch.Tensor | None]:
    """The older ``vmap`` (``is_grads_batched``): runs where functorch's rules refuse an operation,
    most layers' backward once per row."""
    return list(torch.autograd.grad(outs, params, grad_outputs=pieces, allow_unused=True,
                                     retain_graph=retain, is_grads_batched=True))


#: The batched backwards, in the order they are tried; "auto" and "batched" try both.
_BATCHED = {"vmap": _vmapped_grads, "legacy": _legacy_grads}


def _batched_vjp(outs, pieces, params, mode, retain_graph):
    tries = tuple(_BATCHED) if mode in ("auto", "batched") else (mode,) if mode in _BATCHED else ()
    failure = None
    for i, kind in enumerate(tries):
        last = i == len(tries) - 1 and mode != "auto"  # nothing follows a failure of this one
        try:
            # a pass that another may follow keeps the graph, should it fail midway
            return _BATCHED[kind](outs, pieces, params, retain_graph or not last), kind
        except RuntimeError as exc:
            if last or "donated buffer" in str(exc):
                raise
            failure = exc
    if failure is not None:  # "auto", and no batched backward ran: the default filter warns once per site
        warnings.warn(
            "wngkernels: the batched backward failed on this graph "
            f"({str(failure).splitlines()[0][:200]}); computing the rows with separate backward passes",
            UserWarning, stacklevel=4,
        )
    r = pieces[0].shape[0]
    per_row = [torch.autograd.grad(outs, params, grad_outputs=[p[k] for p in pieces], allow_unused=True,
                                   retain_graph=retain_graph or k < r - 1) for k in range(r)]
    return [None if per_row[0][j] is None else torch.stack([g[j] for g in per_row])
            for j in range(len(params))], "loop"


def jacobian_vjp_rows(outputs, cotangents: torch.Tensor, params: Sequence[torch.Tensor], *,
                      vjp_mode: str = "auto", dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""``M`` vector–Jacobian products of the outputs w.r.t. ``params``, flattened: ``(M, q)``.

    .. math:: R[m, :] = \sum_{n,i} A[m, n, i]\, \nabla_\theta X_{n,i}

    The graph is retained, so the user's ``loss.backward()`` can follow.

    Parameters
    ----------
    outputs : Tensor or sequence of Tensor
        As in :func:`flatten_outputs`; ``X`` is their flattened ``(N, d)`` view.
    cotangents : Tensor, shape (M, N, d)
        ``A``; cast to each output's dtype for the backward.
    params : sequence of Tensor
        The ``θ`` blocks, flattened and concatenated in this order (``q = Σ numel``). A
        parameter the outputs do not reach gets zero columns.
    vjp_mode : {"auto", "batched", "loop"}
        ``"batched"``: one ``vmap``-ed backward (``torch.func.vmap``); ``"loop"``: ``M``
        backward passes with ``retain_graph`` (the authors' way; the reference for tests);
        ``"auto"``: batched, falling back to the loop (with one warning) where an operation
        cannot run under ``vmap`` (e.g. some compiled graphs).
    dtype : torch.dtype, optional
        Dtype of the result; default the parameters' common dtype.

    Returns
    -------
    Tensor, shape (M, q)
    """
    outs = _as_output_list(outputs)
    params = list(params)
    if dtype is None:
        dtype = params[0].dtype
        for p in params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
    grads, _ = batched_vjp(outs, _split_cotangents(outs, cotangents), params, vjp_mode=vjp_mode)
    return _rows_from_grads(grads, params, cotangents.shape[0], dtype)


def t_matrix_and_grad(outputs, loss: torch.Tensor, params: Sequence[torch.Tensor], *, kernel, basis,
                      vjp_mode: str = "auto"):
    r"""``T`` ``(M, q)`` and ``g = ∇_θ L`` ``(q,)`` for one batch, without touching ``.grad``.

    ``T`` comes from one batched backward with the cotangents of :func:`wngkernels.cotangents`
    on ``X`` = the detached, flattened outputs; ``g`` from ``torch.autograd.grad(loss, params)``
    (so terms of the loss that do not flow through the outputs, such as weight decay, count).
    Both are in float32 or better.

    Parameters
    ----------
    outputs : Tensor or sequence of Tensor
        ``h_θ(Z)``, shape ``(N, ...)``, attached to the graph.
    loss : Tensor
        A scalar computed from the same graph.
    params : sequence of Tensor
    kernel : wngkernels.Kernel
        A bandwidth rule is evaluated on (basis points, ``X``).
    basis : wngkernels.NystromBasis
    vjp_mode : {"auto", "batched", "loop"}
        See :func:`jacobian_vjp_rows`.

    Returns
    -------
    t : Tensor, shape (M, q)
    g : Tensor, shape (q,)
    """
    from ..estimator import cotangents as _cotangents

    x = flatten_outputs(outputs)
    _check_loss(loss)
    params = list(params)
    dtype = _work_dtype(x, params)
    cot = _cotangents(x.detach().to(dtype), kernel=kernel, basis=basis)
    t = jacobian_vjp_rows(outputs, cot, params, vjp_mode=vjp_mode, dtype=dtype)
    grads = torch.autograd.grad(loss.reshape(()), params, retain_graph=True, allow_unused=True)
    g = _rows_from_grads(grads, params, 1, dtype)[0]
    return t, g


def _check_loss(loss) -> None:
    """``TypeError`` for a non-tensor, ``ValueError`` for a tensor of more than one element."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss must be a scalar tensor; got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss must be a scalar tensor; got shape {tuple(loss.shape)}")


def _work_dtype(x: torch.Tensor, params) -> torch.dtype:
    """float64 if the outputs or any parameter is float64, else float32 (never half precision)."""
    wide = x.dtype == torch.float64 or any(p.dtype == torch.float64 for p in params)
    return torch.float64 if wide else torch.float32

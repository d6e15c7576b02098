"""KWNG's direction: the refresh (``T̃`` and ``D``), the solve from the cache, ``⟨g, w⟩`` and ``‖w‖``
in one read, clipping, the half-precision fit, and writing ``.grad``."""

from __future__ import annotations

import numpy as np
import torch
from array_api_compat import array_namespace

from ..solve import (
    _damping_of_norms,
    _factorize,
    damping_from_whitened,
    solve_whitened,
    whiten,
)
from ._state import _Pending, _Refresh
from ._syncfree import CholeskySolver, factorize, whitening_factor


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all ``i``, as one fused launch where torch has it."""
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


def decided_direction(w: torch.Tensor, g: torch.Tensor,
                      clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The direction to write, decided on the device: ``w``, or ``g`` where ``w`` is non-finite or
    not a descent direction (``⟨g, w⟩ <= 0`` with ``w != 0``; ``g = 0`` gives ``w = 0``), clipped
    to norm ``clip``; and float64 ``[fell back (0 or 1), ⟨g, direction⟩]`` for the host, read with
    the step's other values where they are read after it (``⟨g, w⟩`` and the norms accumulate in
    float64). Nothing is read here: the direction can be written before that read."""
    gw, norm = dot_and_norm(g, w)
    ok = torch.isfinite(gw) & torch.isfinite(norm) & ((gw > 0) | (norm == 0))
    g_gw, g_norm = dot_and_norm(g, g)
    gw, norm = torch.where(ok, gw, g_gw), torch.where(ok, norm, g_norm)
    scale = torch.ones_like(norm) if clip is None else torch.where(norm > clip, clip / norm, 1.0)
    out = torch.where(ok, w, g).mul_(scale.to(w.dtype))
    return out, torch.stack([(~ok).to(torch.float64), gw * scale])


def fits(w: torch.Tensor, grads: list[torch.Tensor], read: bool = True) -> bool:
    """Whether ``w``'s entries fit the narrowest ``.grad`` dtype (float16's 65504). Reads the
    device (one scalar) only where a gradient is narrower than ``w``; with ``read=False`` such a
    ``w`` counts as not fitting."""
    limit = grad_limit(grads, w.dtype)
    return limit is None or (read and float(w.abs().max()) <= limit)


def grad_limit(grads: list[torch.Tensor], dtype: torch.dtype) -> float | None:
    """The narrowest ``.grad`` dtype's largest number where it is below ``dtype``'s, else ``None``."""
    limit = min(torch.finfo(p.dtype).max for p in grads)
    return None if limit >= torch.finfo(dtype).max else float(limit)


def dot_and_norm(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[⟨g, w⟩, ‖w‖]`` float64 on the device (accumulated in float64: a long step never overflows),
    for one host read. A non-finite entry of ``w`` makes both non-finite."""
    return torch.stack([torch.dot(g, w).double(), torch.linalg.vector_norm(w, dtype=torch.float64)])


def refreshed(cc, t, pend: _Pending, scale: float, *, lam: float, damping: str, floor: float,
              step: int) -> _Refresh | None:
    """``T̃`` of ``scale · t`` and ``D`` (``damping="jacobian"``: the guard ``floor``); ``None`` if
    ``C Cᵀ`` is not finite (non-finite outputs, or a bandwidth left on the device that proved
    unusable). Where the capture whitened the cotangents (``pend.whitened``), ``t`` is ``T̃`` already.
    A non-finite ``T`` shows up in the solve's result, which then falls back to ``g``."""
    usable, t_white = (True, t) if pend.whitened else checked_whitening(
        cc, pend, lam, lambda k: whiten(cc, t, k=k, lam=lam, scale=scale))  # its first read: max |C Cᵀ|
    if not usable:
        return None
    return _with_damping(t_white, pend, damping, floor, step)


def refreshed_sync_free(pend: _Pending, damping: str, floor: float, step: int) -> _Refresh:
    """:func:`refreshed` reading nothing (``sync_free``, ``λ = 0``): ``T̃`` whitened by
    :func:`~._syncfree.whitening_factor` of the float64 ``C Cᵀ`` where the capture did not, and the
    damping's float64 norms whatever ``T̃``'s dtype. A non-finite ``C Cᵀ`` or ``T`` gives a NaN ``T̃``."""
    t_white = pend.t
    if not pend.whitened:
        scale = 1.0 / (pend.factor * pend.n)
        t_white = whitening_factor(pend.cc64 / pend.n, pend.t.dtype, scale) @ pend.t
    return _with_damping(t_white, pend, damping, floor, step, read_free=True)


def _with_damping(t_white, pend: _Pending, damping: str, floor: float, step: int,
                  read_free: bool = False) -> _Refresh:
    """The refresh of ``T̃``: with ``D`` (:func:`jacobian_damping`) for ``damping="jacobian"``."""
    if damping != "jacobian":
        return _Refresh(t_white, None, pend.active, step)
    dmp, bound = jacobian_damping(t_white, floor, read_free=read_free)
    return _Refresh(t_white, dmp, pend.active, step, s_bound=bound)


def jacobian_damping(t_white: torch.Tensor, floor: float, read_free: bool = False):
    """:func:`~wngkernels.damping_from_whitened` without a read where ``T̃`` is float32 (or
    narrower): its column norms accumulated in float64, where no square of a float32 number
    under- or overflows, are exact as they are, so no read decides on a scaled second pass (the
    core's check). Wider ``T̃``: the core's function.

    Returns ``D`` and, from the same norms (float32 ``T̃`` only, else ``None``), the 0-d bound
    ``max_j ‖T̃_j‖ D_jj^{1/2}`` of ``max |S|`` (``S = T̃ D^{1/2}``; within a factor ``sqrt(M)`` of it)
    that the factorisation scales ``S`` by instead of reading ``T̃`` twice for its column maxima.
    With ``read_free`` a wider ``T̃`` takes the same float64 norms (their squares under- or
    overflow only for entries beyond ``1e±154``)."""
    if torch.finfo(t_white.dtype).bits > 32 and not read_free:
        return damping_from_whitened(t_white, floor=floor), None
    # rounded to T̃'s dtype, as the core's are (a norm beyond its range is Inf there too: D = 0)
    norms = torch.linalg.vector_norm(t_white, dim=0, dtype=torch.float64).to(t_white.dtype)
    dmp = _damping_of_norms(array_namespace(t_white), norms, floor, t_white.dtype)
    return dmp, torch.max(norms * torch.sqrt(dmp)) if norms.numel() else None


def checked_whitening(cc, pend: _Pending, lam: float, whitening):
    """``(True, whitening(k))``, ``k`` the basis's ``K`` where ``lam > 0`` (else ``None``); ``(False,
    None)`` where the bandwidth left on the device is unusable or ``C Cᵀ`` is not finite — the core's
    ``ValueError``, told apart from other causes (raised: a non-finite ``K``, an overflowing ``lam``)
    by reading ``C Cᵀ``'s finiteness again, on failure only."""
    k = None
    if lam > 0:
        kernel = pend.resolved_kernel()
        if kernel is None:
            return False, None
        k = kernel.basis_gram(pend.points, pend.dims)
    try:
        return True, whitening(k)
    except ValueError:
        if bool(torch.isfinite(cc).all()):
            raise
        return False, None


def cached_direction(c: _Refresh | None, g, params, present, eps: float):
    """``w`` for ``g`` of the ``present`` parameters from a refresh's ``T̃`` and ``D``; ``None``
    where there is none or it cannot give one (a non-finite ``T̃``, ``w`` beyond the dtype)."""
    if c is None:
        return None
    tw, dmp = c.t_white, c.damping
    if len(present) == len(params):
        # factorised once per refresh: between refreshes a step costs a few products
        solver = c.solver
        if solver is None or solver.values.dtype != g.dtype:
            try:
                # the stable dual form: the authors' Woodbury form, tried, fell back to g
                # 10 times a run on the seed's ResNet-18 (H100, float32; docs/benchmarks.md)
                # S's scale from the damping's norms where they were taken (s_bound), else from S
                solver = _factorize(array_namespace(tw), tw.to(g.dtype),
                                    None if dmp is None else dmp.to(g.dtype), "auto", s_bound=c.s_bound)
            except (torch.linalg.LinAlgError, ValueError):  # a non-finite T: the step falls back to g
                return None
            c.solver = solver
        return solver.solve(g, eps, check_finite=False)  # g is checked in step()
    if len(present) < len(params):
        tw, dmp = present_columns(tw, dmp, params, present)
    try:
        return solve_whitened(tw.to(g.dtype), g, eps=eps,
                              damping=None if dmp is None else dmp.to(g.dtype))
    except (torch.linalg.LinAlgError, ValueError):  # non-finite T, or w beyond the dtype: g
        return None


def present_columns(tw: torch.Tensor, dmp: torch.Tensor | None, params, present):
    """The columns of ``T̃`` ``(M, q)`` and the entries of ``D`` ``(q,)`` of the ``present``
    parameters (those with a ``.grad``), in their order."""
    sizes = [p.numel() for p in params]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    keep = np.concatenate([np.arange(starts[j], starts[j + 1]) for j in present])
    keep = torch.as_tensor(keep, device=tw.device)
    return tw.index_select(1, keep), None if dmp is None else dmp.index_select(0, keep)


def sync_free_solver(c: _Refresh | None, g, params, present) -> tuple[CholeskySolver | None, bool]:
    """The ``sync_free`` solver for ``g`` of the ``present`` parameters from a refresh's ``T̃`` and ``D``
    (:mod:`._syncfree`'s Cholesky factorisation, reading nothing), and whether it is the cache's own
    (factorised once per refresh, where every parameter has a ``.grad``; the unseen-parameter rule
    dropped once the device has told that nothing is excluded) rather than one for this step's
    columns. ``(None, False)`` without a cache. A non-finite ``T̃`` gives a solver whose directions
    are non-finite (the step falls back to ``g``)."""
    if c is None:
        return None, False
    tw, dmp = c.t_white, c.damping
    if len(present) < len(params):
        tw, dmp = present_columns(tw, dmp, params, present)
        return factorize(tw.to(g.dtype), None if dmp is None else dmp.to(g.dtype)), False
    solver = c.solver
    if not isinstance(solver, CholeskySolver) or solver.factor.dtype != g.dtype:
        solver = factorize(tw.to(g.dtype), None if dmp is None else dmp.to(g.dtype), s_bound=c.s_bound)
    c.solver = solver = solver.settled()
    return solver, True

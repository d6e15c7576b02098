"""The capture half of :class:`~wngkernels.torch.KWNG`: the basis draw, the bandwidth (over the
process group), ``Σ_n H_n H_nᵀ`` and ``T``'s rows from one batched backward (with the loss's
gradient as one more row where it can ride on it)."""

from __future__ import annotations

import math

import numpy as np
import torch
from array_api_compat import array_namespace

from ..bandwidth import AuthorsRule
from ..estimator import _gram_of_rows
from ..kernels import Kernel
from ..nystrom import NystromBasis, nystrom_basis
from ..solve import _whitening_factor
from ._batched import (
    _as_output_list,
    _check_loss,
    _rows_from_grads,
    _split_cotangents,
    _work_dtype,
    batched_vjp,
    flatten_outputs,
    grad_only_through,
)
from ._direction import checked_whitening
from ._graphs import first_rows, kernel_rows
from ._state import _Pending
from ._syncfree import whitening_factor


class _Capture:
    """KWNG's capture methods (its state lives on the instance: see ``KWNG.__init__``)."""

    def _active(self) -> tuple[int, ...]:
        return tuple(i for i, p in enumerate(self._params) if p.requires_grad)

    def _needs_refresh(self, active) -> bool:
        c = self._cache
        return c is None or c.active != active or self._step - c.step >= self.refresh_every

    def _capture(self, outputs, loss, basis, fuse: bool) -> bool:
        """:meth:`capture`; with ``fuse``, also ``loss``'s gradient where it can ride on ``T``'s backward.

        Returns whether ``.grad`` received the loss's gradient (then no ``backward`` must follow).
        """
        x = flatten_outputs(outputs)
        if loss is not None:
            _check_loss(loss)
        if basis is not None and not isinstance(basis, NystromBasis):
            raise TypeError(f"basis must be a NystromBasis; got {type(basis).__name__}")
        pend = self._pending
        if basis is not None and pend is not None:
            raise ValueError("basis can only be given at the first micro-batch of a step")
        if pend is not None and pend.count >= self.accumulation_steps:
            raise RuntimeError(
                f"capture was called {pend.count + 1} times without step() "
                f"(accumulation_steps={self.accumulation_steps})"
            )
        active = self._active()
        if not active:
            raise ValueError("no parameter requires grad: nothing to precondition")
        params = [self._params[i] for i in active]
        dtype = _work_dtype(x, params)
        xd = x.detach().to(dtype)
        if pend is None:
            if basis is not None:
                basis.check(*xd.shape)
            pend = _Pending(rng_state=self._draws.get_state(), active=active,
                            refresh=basis is not None or self._needs_refresh(active))
        elif pend.active != active:
            self._discard(pend)
            raise RuntimeError("the set of parameters requiring grad changed between micro-batches; "
                               "the step's captured micro-batches were discarded")
        try:
            return self._accumulate(pend, outputs, x, xd, loss, basis, params, dtype, fuse)
        except BaseException:
            self._discard(pend)  # no half-captured step is left behind to be stepped on
            raise

    def _discard(self, pend: _Pending) -> None:
        """Forget a step's captured micro-batches and rewind a private generator to its start."""
        self._pending = None
        self._draws.set_state(pend.rng_state)

    def _accumulate(self, pend, outputs, x, xd, loss, basis, params, dtype, fuse) -> bool:
        rows = None
        if self._pending is None:
            if pend.refresh:
                rows = self._draw(pend, xd, basis)
            self._pending = pend
        pend.count += 1
        pend.n += x.shape[0]
        if loss is not None:
            pend.loss_sum = pend.loss_sum + loss.detach().reshape(()).to(torch.float64)  # no host read
            pend.loss_count += 1
        if pend.refresh and not pend.bad:
            if xd.shape[1] != pend.points.shape[1]:
                raise ValueError(
                    f"outputs must have d = {pend.points.shape[1]} features per sample in every "
                    f"micro-batch; got {xd.shape[1]}"
                )
            if rows is None:  # else the draw's graph gave them, and C Cᵀ
                rows = _kernel_rows(pend, xd)
                pend.cc += _gram_of_rows(array_namespace(xd), rows)
            if self.sync_free:  # the Cholesky whitening factorises C Cᵀ taken in float64
                cc64 = _gram_of_rows(array_namespace(xd), rows.to(torch.float64))
                pend.cc64 = cc64 if pend.cc64 is None else pend.cc64 + cc64
            if self._whitens_cotangents(outputs):
                rows = self._whitened(pend, rows)
                if rows is None:  # C Cᵀ not finite (outputs, bandwidth): the refresh is dropped, g written
                    pend.bad = True
                    return False
            return self._backward(outputs, rows, loss if fuse else None, params, pend, dtype)
        return False

    def _whitens_cotangents(self, outputs) -> bool:
        """Whether ``C Cᵀ`` is complete before the backward and ``T̃`` can come out of it directly: one
        micro-batch per step in a single process, no grad scaler, outputs in float32 or wider."""
        if self.accumulation_steps != 1 or (self._comm.active and self._comm.world_size > 1):
            return False
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            return False
        return all(torch.finfo(o.dtype).bits >= 32 for o in _as_output_list(outputs))

    def _whitened(self, pend: _Pending, rows: torch.Tensor) -> torch.Tensor | None:
        """The cotangent rows whitened: ``factor · rows`` with :func:`~wngkernels.whiten`'s ``M × M``
        factor of ``C Cᵀ/N`` (and ``λK``), so that the batched backward gives ``T̃`` itself — ``T`` is
        linear in its cotangents — and no ``(M × M)·(M × q)`` product follows it. Reads ``max |C Cᵀ|``
        and the eigen-decomposition's status (the GPU has only the forward pass before it). ``None``
        where ``C Cᵀ`` (or ``K``) is not finite, or the bandwidth left on the device is unusable."""
        m, n = rows.shape[0], rows.shape[1]
        if self.sync_free:  # λ = 0 there; nothing is checked or read (a non-finite C Cᵀ: T̃ is NaN)
            pend.whitened = True
            return (whitening_factor(pend.cc64 / n, rows.dtype) @ rows.reshape(m, -1)).reshape(rows.shape)
        xp, lam, cc = array_namespace(rows), self._value(self.lam, "lam", False), pend.cc / n
        usable, factor = checked_whitening(
            cc, pend, lam, lambda k: _whitening_factor(xp, cc, k, lam, None, 1.0, rows.dtype))
        if not usable:
            return None
        pend.whitened = True
        if factor is None:  # C Cᵀ + λK = 0: every direction is cut, T̃ = 0
            return torch.zeros_like(rows)
        return (factor @ rows.reshape(m, -1)).reshape(rows.shape)

    def _backward(self, outputs, rows, loss, params, pend: _Pending, dtype) -> bool:
        """``T``'s rows into ``pend.t``; with a ``loss`` that reaches ``params`` only through the
        outputs, its gradient as one more row of the same batched backward, accumulated into
        ``.grad`` as ``loss.backward()`` would (scaled by the grad scaler's factor)."""
        outs = _as_output_list(outputs)
        scale = self._loss_scale(rows.device)
        m, n = rows.shape[0], rows.shape[1]
        if pend.t is None:  # one scale for every micro-batch: T accumulates without rescaling passes
            pend.factor = scale / n
        pieces = _split_cotangents(outs, rows * pend.factor)
        roots = outs
        fused = loss is not None and self._can_fuse(loss, outs, params)
        if fused:  # the loss as one more root: its row's cotangent is the scale at the loss, 0 at the outputs
            roots = [*outs, loss]
            pieces = [torch.cat([p, p.new_zeros((1, *p.shape[1:]))]) for p in pieces]
            pieces.append(torch.zeros((m + 1, *loss.shape), dtype=loss.dtype, device=loss.device))
            pieces[-1][m].fill_(scale)  # fill_, not item assignment: that copies the number from the host
        # "auto" settles on the mode that worked the first time, so later passes can free the graph
        grads, self._vjp_used = batched_vjp(roots, pieces, params, vjp_mode=self._vjp_used or self.vjp_mode,
                                            retain_graph=not fused)
        # one copy of every row, the loss's too: T's rows, and the loss's row whose pieces become .grad
        rows_all = _rows_from_grads(grads, params, m + fused, dtype)
        t = rows_all[:m]
        pend.t = t if pend.t is None else pend.t + t
        if fused:
            pieces = torch.split(rows_all[m], [p.numel() for p in params])
            for p, g, v in zip(params, grads, pieces, strict=True):
                if g is None:
                    continue
                v = v.view_as(p)
                if p.grad is not None:
                    p.grad = p.grad + v.to(p.grad.dtype)
                else:  # a view of the copied row where the dtypes agree (no copy per parameter)
                    p.grad = v if v.dtype == p.dtype else v.to(p.dtype)
        return fused

    @staticmethod
    def _can_fuse(loss, outs, params) -> bool:
        """One backward for ``T`` and ``g`` is exact only where nothing else expects ``loss.backward()``:
        no process group (DDP's reducer hooks the gradient accumulators), no hooks on the
        parameters, and a loss that reaches only ``params``, only through the outputs, and each of
        them (else ``loss.backward()`` would leave some ``.grad`` as ``None`` that the row fills)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return False
        if any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in params):
            return False
        return grad_only_through(loss, outs, params, every_output=True)

    def _loss_scale(self, device) -> float:
        """The grad scaler's factor (1 without one); initialises a fresh scaler on ``device``, as the
        ``scaler.scale(loss)`` that a fused backward replaces would."""
        s = self.grad_scaler
        if s is None or not s.is_enabled():
            return 1.0
        return float(s.scale(torch.ones((), device=device)))

    def _draw(self, pend: _Pending, xd: torch.Tensor, basis: NystromBasis | None) -> torch.Tensor | None:
        """Basis points and dims (rank 0's, broadcast) and the kernel: with its bandwidth resolved,
        or (a single process, :class:`~wngkernels.AuthorsRule` or a fixed bandwidth) with the
        bandwidth left on the device in ``pend.ell``. A single process reads nothing here (the
        whitening of the cotangents, where it applies, reads ``max |C Cᵀ|`` later; otherwise the
        batched backward is queued behind the forward pass without waiting for it), and computes
        the micro-batch's kernel rows and their ``C Cᵀ`` with the draw (:func:`first_rows`, replayed
        from a CUDA graph where :meth:`_graphed`): returns the rows then, else ``None``."""
        comm = self._comm
        if basis is None:
            basis = nystrom_basis(tuple(xd.shape), self._pairs(xd), rng=self._draws.rng())
        dev, m, rule = xd.device, basis.num_basis, self.kernel.bandwidth
        self.last_basis = basis
        group = comm.active and comm.world_size > 1
        if not group and (isinstance(rule, AuthorsRule) or not callable(rule)):
            # non-finite outputs make ℓ NaN, and the rows NaN (kernel_rows): the refresh is dropped
            pairs = _to_device(np.concatenate([basis.indices, basis.dims]), dev)  # one copy for both
            run = self._graphs if self._graphed(xd) else first_rows
            pend.points, pend.onehot, pend.ell, rows, pend.cc = run(self.kernel, xd, pairs)
            pend.dims, pend.kernel = pairs[m:], self.kernel
            if pend.ell is not None:
                self._last_pending = (self.kernel, pend.ell)
            else:
                self._last_kernel, self._last_pending = self.kernel, None
            return rows
        points = xd.index_select(0, _to_device(basis.indices, dev))
        dims = _to_device(basis.dims, dev)
        if group:
            comm.broadcast_(points)
            comm.broadcast_(dims)
        pend.cc = torch.zeros(m, m, dtype=xd.dtype, device=dev)
        pend.points, pend.dims = points, dims
        pend.onehot = (dims[:, None] == torch.arange(xd.shape[1], device=dev)).to(xd.dtype)  # E (M, d)
        finite = torch.isfinite(xd).all().to(xd.dtype).reshape(1)
        if float(comm.sum_(finite)) < comm.world_size:
            pend.bad = True
            return None
        try:
            pend.kernel = self._resolve(points, xd)
        except ValueError:  # e.g. all outputs equal: the bandwidth rule gives 0
            pend.bad = True
            return None
        self._last_kernel, self._last_pending = pend.kernel, None
        return None

    def _graphed(self, xd: torch.Tensor) -> bool:
        """Whether the draw's device work is replayed from a CUDA graph: ``cuda_graphs``, CUDA
        outputs, one micro-batch per step, and no graph being captured by the caller."""
        if self._graphs is None or xd.device.type != "cuda" or self.accumulation_steps != 1:
            return False
        return not torch.cuda.is_current_stream_capturing()

    def _pairs(self, xd: torch.Tensor) -> int:
        """``M``, or fewer where a batch has fewer pairs ``N·d`` (a short last batch): every rank
        takes the smallest ``N·d`` of the group, so all draw the same number. Counted. Every rank
        raises ``ValueError`` if the ranks' outputs have different ``d``."""
        n, d = xd.shape
        available = n * d
        if self._comm.active and self._comm.world_size > 1:
            got = self._comm.min_(torch.tensor([available, d, -d], device=xd.device)).tolist()
            available, low, high = got[0], got[1], -got[2]
            if low != high:
                raise ValueError(f"outputs must have the same number of features d on every rank; the ranks "
                                 f"have d from {low} to {high}")
        if available < self.num_basis:
            self.num_short_batches += 1
            return available
        return self.num_basis

    def _resolve(self, points: torch.Tensor, xd: torch.Tensor) -> Kernel:
        kernel, comm = self.kernel, self._comm
        rule = kernel.bandwidth
        if not callable(rule):
            return kernel
        if not comm.active or comm.world_size == 1:
            return kernel.resolve(points, xd)
        if isinstance(rule, AuthorsRule):
            # the rule on the union batch: global mean, then the mean squared deviation
            stats = comm.sum_(torch.cat([xd.sum(0), xd.new_tensor([xd.shape[0]])]))
            center = stats[:-1] / stats[-1]
            dev = comm.sum_(((xd - center) ** 2).sum().reshape(1))
            mean_sq = float(AuthorsRule._mean_square(array_namespace(xd), points, center, dev[0] / stats[-1]))
            return kernel.with_bandwidth(rule.from_mean_square(mean_sq))  # 0 or an overflow: ValueError
        # another rule: rank 0 evaluates it on its own batch; a failure there (NaN) reaches every rank
        ell = math.nan
        if comm.rank == 0:
            try:
                ell = kernel.resolve(points, xd).bandwidth
            except ValueError:
                pass
        ell = float(comm.broadcast_(xd.new_tensor([ell], dtype=torch.float64))[0])
        if not math.isfinite(ell) or ell <= 0:
            raise ValueError(f"the bandwidth rule gave a degenerate bandwidth on rank 0 ({ell})")
        return kernel.with_bandwidth(ell)


def _kernel_rows(pend: _Pending, xd: torch.Tensor) -> torch.Tensor:
    """The kernel's rows ``(M, n, d)`` of a micro-batch with the step's basis (:func:`kernel_rows`)."""
    return kernel_rows(pend.kernel, pend.points, pend.onehot, xd, pend.ell)


def _to_device(a, device: torch.device) -> torch.Tensor:
    """A small host array on ``device``; on CUDA through pinned memory, without blocking (a copy
    from pageable memory would wait for the stream's queued work)."""
    t = torch.from_numpy(np.array(a))  # a writable copy
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

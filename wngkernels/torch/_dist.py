"""``torch.distributed`` helpers: world size 1 whenever no process group is initialised.

Data parallel KWNG: DDP all-reduces only what autograd
accumulates into ``.grad``; ``T`` and ``C Cᵀ`` come from ``autograd.grad`` and are reduced here,
explicitly, and the basis is broadcast from rank 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._state import _Pending, _Reduced

__all__ = ["Comm", "reduce_step"]


class Comm:
    """The process group KWNG talks to, or a stand-in for a single process.

    Parameters
    ----------
    enabled : bool or None
        ``None``: distributed when ``torch.distributed`` is available and initialised;
        ``False``: always a single process.
    group : ProcessGroup, optional
        Default: the world.
    """

    def __init__(self, enabled: bool | None = None, group=None):
        active = dist.is_available() and dist.is_initialized()
        if enabled and not active:
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        self.active = bool(active if enabled is None else enabled and active)
        self.group = group

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.active else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.active else 0

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite ``tensor`` with rank 0's (the group's first rank's) copy, in place."""
        if self.active and self.world_size > 1:
            src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            dist.broadcast(tensor, src=src, group=self.group)
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` by sum, in place."""
        if self.active and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` by minimum, in place."""
        if self.active and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return tensor

    def sum_all(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum-reduce several tensors of one dtype and device in one collective; new tensors."""
        sizes = [t.numel() for t in tensors]
        flat = self.sum_(torch.cat([t.reshape(-1) for t in tensors]))
        return [p.reshape(t.shape) for p, t in zip(torch.split(flat, sizes), tensors, strict=True)]


def reduce_step(comm: Comm, pend: _Pending, params, g: torch.Tensor, accumulation_steps: int,
                extra: torch.Tensor | None = None) -> _Reduced:
    """Sum ``C Cᵀ``, ``T``, the counts and the failure flags over the process group (one
    collective for the matrices, one for the float64 counts, which stay exact).

    One host read per step, of the values that live on the device (the loss and ``g``'s
    finiteness). A single process reads only those two: the counts are already on the host, and
    a small tensor made from host values (``torch.tensor(..., device=cuda)``) is a copy from
    pageable memory, which CUDA orders after all queued work: a second wait for the GPU.
    ``extra`` (float64 ``(k,)``, a single process only) is read with them, into ``_Reduced.extra``.
    """
    g_bad = (~torch.isfinite(g)).any().to(torch.float64)
    loss = pend.loss_sum.to(g.device) if isinstance(pend.loss_sum, torch.Tensor) else g_bad.new_zeros(())
    cc, t = pend.cc, pend.t
    t_factor = pend.factor
    if comm.active and comm.world_size > 1:
        if pend.refresh and t is None:  # no backward ran (non-finite outputs): zeros for the collective
            t = torch.zeros(cc.shape[0], sum(p.numel() for p in params), dtype=g.dtype, device=g.device)
        if pend.refresh:  # each rank scaled its cotangents by its own batch size: undo before the sum
            cc, t = comm.sum_all([cc, t / t_factor])
            t_factor = 1.0
        if extra is not None:
            raise ValueError("extra values are read with a single process only")
        counts = torch.tensor([pend.n, pend.loss_count, float(pend.bad)], dtype=torch.float64,
                              device=g.device)
        stats = comm.sum_(torch.cat([counts, torch.stack([loss, g_bad])]))
        n_tot, loss_count, bad, loss_sum, g_bad = stats.tolist()
        read = None
    else:
        n_tot, loss_count, bad = float(pend.n), float(pend.loss_count), float(pend.bad)
        both = torch.stack([loss, g_bad])
        both = both if extra is None else torch.cat([both, extra.to(both.device)])
        loss_sum, g_bad, *rest = both.tolist()
        read = None if extra is None else tuple(rest)
    world = comm.world_size
    loss_now = loss_sum / world if loss_count == world * accumulation_steps else None
    return _Reduced(cc, t, t_factor, n_tot, loss_now, bad > 0, g_bad > 0, read)

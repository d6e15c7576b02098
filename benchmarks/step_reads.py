"""What one read of the device costs the exact KWNG step: the library's step with its reads stubbed out.

Not a preconditioner to train with: a timing bound (issue 14). The library's exact ``M = 5`` step
on the seed's ResNet-18 (``torch_step.py``'s problem) runs with the operations that synchronise
the host with the GPU replaced by stand-ins that do not: every ``M × M`` eigen-decomposition (the
diagonal and the identity, computed on the device), the whitening's ``max |C Cᵀ|`` (1.0) and the
damping's flag (no zero entry). The numbers those give are **wrong by construction**, so these
steps train nothing: the learning rate is 0 (the parameters never move, so wrong directions
cannot corrupt them) and ``adaptive_eps`` is off (no reduction-ratio rule to feed). The kernels
launched are the same as the real step's.

Methods (``--methods``; every one timed in the same run, rounds interleaved):

- ``sgd``, ``authors5``, ``kwng5``: as in ``torch_step.py``;
- ``frozen``: ``kwng5`` with the learning rate 0 and ``adaptive_eps`` off, real numbers (the
  reference for the three below);
- ``stub_read_end``: the stand-ins, and the step's own read (its statistics, after the direction);
- ``stub_read_g``: the stand-ins, the step's read removed, and one read of ``g``'s finiteness
  right after the backward (where a guard on ``g`` would read);
- ``stub_no_read``: the stand-ins and no read at all: the host may run a step ahead of the GPU;
- ``sync_free``: ``KWNG(sync_free=True)``, the library's read-free step, real numbers and training
  (learning rate and ``adaptive_eps`` as ``kwng5``).

``--syncs`` (CUDA) counts each method's synchronisations in one step with CUDA's sync debug mode.

    python benchmarks/step_reads.py --device cuda --rounds 4 --syncs
    python benchmarks/step_reads.py --quick          # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lean_step import interleaved, parser, report  # noqa: E402
from torch_step import make_step  # noqa: E402

import wngkernels._backend as _backend  # noqa: E402
import wngkernels.solve as _solve  # noqa: E402
import wngkernels.torch.preconditioner as _pre  # noqa: E402
from wngkernels.torch._state import _Reduced  # noqa: E402

METHODS = ("sgd", "authors5", "kwng5", "frozen", "stub_read_end", "stub_read_g", "stub_no_read", "sync_free")
_READS = {"stub_read_end": "end", "stub_read_g": "g", "stub_no_read": None}


def _linalg():
    """The namespace whose ``eigh`` the core calls on torch tensors (array-api-compat's)."""
    import array_api_compat.torch as xt

    return xt.linalg


def _eigh_stand_in(a):
    """Not an eigen-decomposition: ``(|diag a| + 1, I)``, on the device, reading nothing."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return a.diagonal().abs() + 1.0, eye + 0 * a


def _reduce_no_read(comm, pend, params, g, accumulation_steps, extra=None):
    """``reduce_step`` for a single process without its read: a finite ``g``, a loss of 1."""
    return _Reduced(pend.cc, pend.t, pend.factor, float(pend.n), 1.0, bool(pend.bad), False,
                    None if extra is None else (0.0, 1.0))


@contextlib.contextmanager
def stand_ins(read: str | None):
    """Within the block, the library's step reads the device only where ``read`` says: ``"end"``
    (its own statistics read), ``"g"`` (``g``'s finiteness, right after the backward) or ``None``."""
    linalg, gradient = _linalg(), _pre.KWNG._gradient
    saved = (linalg.eigh, _backend.max_abs, _solve._read_damping_flag, _pre.reduce_step)

    def gradient_read(self, pend, params, present):
        g = gradient(self, pend, params, present)
        bool(torch.isfinite(g).all())
        return g

    linalg.eigh, _backend.max_abs, _solve._read_damping_flag = (
        _eigh_stand_in, lambda xp, *arrays: 1.0, lambda flag: False)
    if read != "end":
        _pre.reduce_step = _reduce_no_read
    if read == "g":
        _pre.KWNG._gradient = gradient_read
    try:
        yield
    finally:
        linalg.eigh, _backend.max_abs, _solve._read_damping_flag, _pre.reduce_step = saved
        _pre.KWNG._gradient = gradient


def _make(name, args, device):
    spec = argparse.Namespace(model="resnet18", batch=args.batch, width=args.width, compile=False)
    if name in ("sgd", "authors5", "kwng5", "sync_free"):
        kind, m = {"sgd": ("sgd", 0), "authors5": ("authors", 5)}.get(name, ("kwng", 5))
        return make_step(kind, m, {"sync_free": True} if name == "sync_free" else {}, spec, device)
    step = make_step("kwng", 5, {"adaptive_eps": False}, spec, device)
    step.kwng.optimizer.param_groups[0]["lr"] = 0.0  # the parameters never move
    if name == "frozen":
        return step

    def stubbed(mark=None):
        with stand_ins(_READS[name]):
            step()

    stubbed.kwng = step.kwng
    return stubbed


def count_syncs(step) -> int:
    """CUDA synchronisations in one call of ``step`` (CUDA's sync debug mode, one warning each)."""
    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # not the mode's notice that it is a prototype (once per process: the first method counted it)
    return sum("synchroniz" in str(w.message) and "prototype" not in str(w.message) for w in caught)


def main(argv=None):
    ap = parser(__doc__.splitlines()[0], METHODS, rounds=3)
    ap.add_argument("--syncs", action="store_true", help="count each method's synchronisations (CUDA)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: 2 steps, batch 16, width 8")
    args = ap.parse_args(argv)
    if args.quick:
        args.device, args.steps, args.warmup, args.batch, args.width = "cpu", 2, 1, 16, 8
        args.rounds = min(args.rounds, 2)
    device = torch.device(args.device)
    names = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.syncs and device.type != "cuda":
        ap.error("--syncs needs --device cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps = {n: _make(n, args, device) for n in names}
    per_round = interleaved(steps, device, args)
    syncs = {n: count_syncs(steps[n]) for n in names} if args.syncs else {}
    return report(per_round, args, device, 5, {"syncs/step": syncs})


if __name__ == "__main__":
    main()

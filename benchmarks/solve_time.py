"""Time of the refresh's linear algebra on a ``T`` of a network's shape, one call per stage.

The stages of a KWNG refresh after ``T``'s backward, on ``T`` ``(M, q)`` and ``C Cᵀ`` ``(M, M)``:
:func:`~wngkernels.whiten`, :func:`~wngkernels.damping_from_whitened`,
:func:`~wngkernels.factorize_whitened` and one :meth:`~wngkernels.WhitenedSolver.solve`, each
timed alone (median of ``--repeat`` GPU-synchronised calls), and the whole chain. ``q`` defaults
to the seed's ResNet-18 (11 173 962 parameters); the columns of ``T`` are graded over four decades,
as in an ill-conditioned network. PyTorch tensors on ``--device``.

    python benchmarks/solve_time.py --device cuda --m 5 64
    python benchmarks/solve_time.py --quick        # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from wngkernels import damping_from_whitened, factorize_whitened, whiten


def median_ms(fn, device, repeat: int, warmup: int = 2) -> float:
    """Median wall time (ms) of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones, each timed
    call GPU-synchronised before and after on a CUDA ``device``."""
    times = []
    for i in range(warmup + repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def mean_ms(fn, device, repeat: int, warmup: int = 2) -> float:
    """Mean wall time (ms) per call of ``repeat`` consecutive calls of ``fn``, timed as one block
    (GPU-synchronised at its two ends only) after ``warmup`` untimed calls: the amortised cost of
    a training step, a periodic refresh included (``torch_step.py``'s timer; a median of single
    calls would report only the steps between refreshes)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1e3 * (time.perf_counter() - start) / repeat


def stage_ms(m: int, q: int, device, repeat: int) -> dict[str, float]:
    """Milliseconds per stage for ``T`` ``(m, q)`` float32 on ``device``."""
    gen = torch.Generator(device=device).manual_seed(0)
    t = torch.randn(m, q, device=device, generator=gen) * torch.logspace(-3, 1, q, device=device)[None, :]
    a = torch.randn(m, 3 * m, device=device, generator=gen)
    cc, g = a @ a.T, torch.randn(q, device=device, generator=gen)
    t_white = whiten(cc, t)
    damping = damping_from_whitened(t_white)
    solver = factorize_whitened(t_white, damping=damping)

    def chain():
        tw = whiten(cc, t)
        factorize_whitened(tw, damping=damping_from_whitened(tw)).solve(g, 1e-5, check_finite=False)

    return {"whiten": median_ms(lambda: whiten(cc, t), device, repeat),
            "damping": median_ms(lambda: damping_from_whitened(t_white), device, repeat),
            "factorize": median_ms(lambda: factorize_whitened(t_white, damping=damping), device, repeat),
            "solve": median_ms(lambda: solver.solve(g, 1e-5, check_finite=False), device, repeat),
            "refresh total": median_ms(chain, device, repeat)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--m", type=int, nargs="+", default=[5, 64])
    ap.add_argument("--q", type=int, default=11_173_962)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: q = 2000, M = 5, 3 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.device, args.m, args.q, args.repeat = "cpu", [5], 2000, 3
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, q = {args.q}, float32, median of {args.repeat}")
    print("| M | whiten | damping | factorize | solve | refresh total |\n|---|---|---|---|---|---|")
    for m in args.m:
        ms = stage_ms(m, args.q, device, args.repeat)
        print(f"| {m} | " + " | ".join(f"{v:.3f}" for v in ms.values()) + " |")


if __name__ == "__main__":
    main()

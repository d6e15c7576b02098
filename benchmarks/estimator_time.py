"""Time and peak host memory of ``kwng_direction`` per backend, one fresh process each.

Default size: N = 10⁴ samples, d = 10, M = 300 basis functions, q = d + 1 (the seed's Gaussian
model, primal regime), float64. Peak memory is the process's maximum resident set size
(``ru_maxrss``) minus the resident size after the inputs are built.

Usage::

    python benchmarks/estimator_time.py [--n 10000] [--d 10] [--m 300] [--repeat 5]
        [--backends numpy torch-cpu torch-cuda cupy]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(backend: str, n: int, d: int, m: int, repeat: int) -> dict:
    import numpy as np

    import wngkernels as wk
    from wngkernels.models import GaussianModel

    model = GaussianModel(d)
    theta, z = model.default_theta(), model.sample_latent(n, rng=0)
    x, jac = model.h(theta, z), model.jacobian(theta, z)
    g = np.random.default_rng(1).normal(size=model.num_params)
    sync = lambda: None  # noqa: E731
    if backend.startswith("torch"):
        import torch

        dev = "cuda" if backend == "torch-cuda" else "cpu"
        x, jac, g = (torch.from_numpy(a).to(dev) for a in (x, jac, g))
        if dev == "cuda":
            sync = torch.cuda.synchronize
    elif backend == "cupy":
        import cupy

        x, jac, g = (cupy.asarray(a) for a in (x, jac, g))
        sync = cupy.cuda.Stream.null.synchronize
    basis = wk.nystrom_basis((n, d), m, rng=0)
    kw = dict(kernel=wk.Gaussian(wk.AuthorsRule()), basis=basis, eps=1e-3, jacobian=jac)
    base = _rss_mib()
    wk.kwng_direction(g, x, **kw)  # warm-up
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        wk.kwng_direction(g, x, **kw)
        sync()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"backend": backend, "median_s": float(np.median(times)), "peak_extra_mib": peak - base}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--d", type=int, default=10)
    p.add_argument("--m", type=int, default=300)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--backends", nargs="+", default=["numpy", "torch-cpu"])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.n, a.d, a.m, a.repeat)))
        return
    rows = []
    for b in a.backends:
        cmd = [sys.executable, __file__, "--child", b, "--n", str(a.n), "--d", str(a.d),
               "--m", str(a.m), "--repeat", str(a.repeat)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{b}: failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = next((r["median_s"] for r in rows if r["backend"] == "numpy"), None)
    print(f"kwng_direction, N={a.n}, d={a.d}, M={a.m}, q={a.d + 1}, float64")
    print("| backend | median time (s) | speed-up over NumPy | peak extra host memory (MiB) |")
    print("|---|---|---|---|")
    for r in rows:
        ratio = f"{ref / r['median_s']:.2f}x faster" if ref else "-"
        print(f"| {r['backend']} | {r['median_s']:.3f} | {ratio} | {r['peak_extra_mib']:.0f} |")


if __name__ == "__main__":
    main()

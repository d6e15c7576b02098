"""Host peak memory and time of ``wngkernels.dask.kwng_direction`` as N grows, against NumPy in memory.

The seed's Gaussian model ``X = a + rZ`` (``q = d + 1``), ``Z`` drawn block by block with a seed
per block, so that both modes see the same samples:

- ``dask``: ``Z``, ``X`` and the Jacobian ``(N, d, q)`` are lazy (``map_blocks`` of the model's
  ``h`` and ``jacobian`` per block of ``--chunk`` samples): nothing of size ``N·d·q`` ever
  exists at once. The time is the whole call, generating the blocks included (twice for ``X``:
  once for its statistics, once with the Jacobian), on Dask's threaded scheduler.
- ``numpy``: ``X`` and the Jacobian built in memory first (time reported apart), then
  ``wngkernels.kwng_direction``.

Each case runs in a fresh process; the peak is that process's maximum resident set size
(``ru_maxrss``: Python, NumPy, Dask and the inputs included), and ``base`` its resident size after
the imports. The last column compares the two modes' directions (the same samples and basis).

Usage::

    python benchmarks/dask_memory.py [--n 100000 300000 1000000] [--d 10] [--m 500]
        [--chunk 100000] [--modes dask numpy] [--max-numpy-gib 16] [--timeout 1800]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

SEED = 0


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _latent_block(n: int, d: int, index: int):
    """Block ``index`` of ``Z``: its own seed, so that any chunking of the same blocks agrees."""
    return np.random.default_rng([SEED, index]).standard_normal((n, d))


def _chunks(n: int, chunk: int) -> tuple[int, ...]:
    return (chunk,) * (n // chunk) + ((n % chunk,) if n % chunk else ())


def _dask_inputs(model, theta, n: int, d: int, chunk: int):
    import dask.array as da

    def latent(block, block_info=None):
        return _latent_block(block.shape[0], d, block_info[0]["chunk-location"][0])

    q = model.num_params
    rows = da.zeros((n, 1), chunks=(_chunks(n, chunk), 1))
    z = rows.map_blocks(latent, chunks=(rows.chunks[0], d), meta=np.empty((0, 0)))
    x = z.map_blocks(lambda zb: model.h(theta, zb), meta=np.empty((0, 0)))
    jac = z.map_blocks(lambda zb: model.jacobian(theta, zb), new_axis=2, chunks=(z.chunks[0], d, q),
                       meta=np.empty((0, 0, 0)))
    return x, jac


def child(mode: str, n: int, d: int, m: int, chunk: int) -> dict:
    import wngkernels as wk
    from wngkernels.models import GaussianModel

    if mode == "dask":
        import dask

        import wngkernels.dask as wkd
    model = GaussianModel(d)
    theta = model.default_theta()
    g = np.random.default_rng(1).normal(size=model.num_params)
    kw = dict(kernel=wk.Gaussian(wk.AuthorsRule()), basis=wk.nystrom_basis((n, d), m, rng=SEED), eps=1e-3)
    base = _rss_mib()
    inputs_s = 0.0
    t0 = time.perf_counter()
    if mode == "dask":
        x, jac = _dask_inputs(model, theta, n, d, chunk)
        with dask.config.set(scheduler="threads"):
            w = wkd.kwng_direction(g, x, jacobian=jac, **kw).compute()
    else:
        z = np.concatenate([_latent_block(c, d, i) for i, c in enumerate(_chunks(n, chunk))])
        x, jac = model.h(theta, z), model.jacobian(theta, z)
        del z
        inputs_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        w = wk.kwng_direction(g, x, jacobian=jac, **kw)
    call_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"mode": mode, "n": n, "call_s": call_s, "inputs_s": inputs_s, "peak_mib": peak,
            "base_mib": base, "w": w.tolist()}


def _positive(text: str) -> int:
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1 or ("e" in text.lower() and float(text) != value):
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=_positive, nargs="+", default=[100_000, 300_000, 1_000_000],
                   help="numbers of samples N (1e5 notation accepted)")
    p.add_argument("--d", type=_positive, default=10, help="dimension d (q = d + 1)")
    p.add_argument("--m", type=_positive, default=500, help="Nyström basis size M")
    p.add_argument("--chunk", type=_positive, default=100_000, help="samples per Dask block")
    p.add_argument("--modes", nargs="+", choices=("dask", "numpy"), default=["dask", "numpy"])
    p.add_argument("--max-numpy-gib", type=float, default=16.0,
                   help="skip the NumPy case where X and the Jacobian would take more than this")
    p.add_argument("--timeout", type=_positive, default=1800, help="seconds per case")
    p.add_argument("--child", choices=("dask", "numpy"), default=None, help=argparse.SUPPRESS)
    return p


def _check(p: argparse.ArgumentParser, a) -> None:
    if not a.max_numpy_gib > 0:
        p.error(f"--max-numpy-gib must be > 0; got {a.max_numpy_gib}")
    for n in a.n:
        if a.m > n * a.d:
            p.error(f"--m must be <= N·d = {n * a.d} for --n {n}; got {a.m}")


def _run_case(a, mode: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--n", str(n), "--d", str(a.d), "--m", str(a.m),
           "--chunk", str(a.chunk)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "n": n, "error": f"over {a.timeout} s"}
    if out.returncode:
        return {"mode": mode, "n": n, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 2**20
    except (OSError, StopIteration, ValueError, IndexError):
        mem = float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; Python {platform.python_version()}, "
            f"NumPy {np.__version__}, Dask {_version('dask')}")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _table(results: list[dict], a) -> str:
    lines = ["| N | mode | call (s) | inputs built (s) | peak RSS (MiB) | peak − base (MiB) "
             "| X + J (MiB) | vs other mode |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    by_case = {(r["n"], r["mode"]): r for r in results}
    for r in results:
        size = r["n"] * a.d * (a.d + 2) * 8 / 2**20
        if "error" in r:
            lines.append(f"| {r['n']:,} | {r['mode']} | {r['error']} | | | | {size:,.0f} | |")
            continue
        other = by_case.get((r["n"], "numpy" if r["mode"] == "dask" else "dask"), {})
        diff = ""
        if "w" in other:
            w, v = np.asarray(r["w"]), np.asarray(other["w"])
            diff = f"{np.linalg.norm(w - v) / np.linalg.norm(v):.1e}"
        built = f"{r['inputs_s']:.1f}" if r["mode"] == "numpy" else "(in the call)"
        lines.append(f"| {r['n']:,} | {r['mode']} | {r['call_s']:.1f} | {built} | {r['peak_mib']:,.0f} "
                     f"| {r['peak_mib'] - r['base_mib']:,.0f} | {size:,.0f} | {diff} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = _parser()
    a = p.parse_args(argv)
    _check(p, a)
    if a.child:
        print(json.dumps(child(a.child, a.n[0], a.d, a.m, a.chunk)))
        return
    results = []
    for n in a.n:
        for mode in a.modes:
            gib = n * a.d * (a.d + 2) * 8 / 2**30
            if mode == "numpy" and gib > a.max_numpy_gib:
                results.append({"mode": mode, "n": n, "error": f"skipped: inputs {gib:.1f} GiB"})
                continue
            results.append(_run_case(a, mode, n))
            print(f"done: N={n} {mode}", file=sys.stderr, flush=True)
    print(f"d = {a.d}, q = {a.d + 1}, M = {a.m}, chunks of {a.chunk:,}; {_machine()}\n")
    print(_table(results, a))


if __name__ == "__main__":
    main()

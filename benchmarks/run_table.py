"""Time the issue's target cases on every backend, without asv, and write a markdown table.

Usage::

    python benchmarks/run_table.py [--backends numpy,torch-cuda,cupy] [--sizes quick|full]
                                   [--dtype float64] [--out docs/table.md]

Each backend runs in its own fresh process (``--in-process`` runs them all in this one), so that
host peak memory, thread pools and GPU allocators do not leak from one backend into the next.
Per case: one warm-up call, then as many timed calls as fit in ``--budget`` seconds (at least
one, at most ``--repeats``); the table gives the median. GPU calls synchronise the device before
the timer stops. Cases (``benchmarks/_problems.py``; ``full`` sizes are the issue's targets):

- ``kwng_direction`` primal (Gaussian model, ``q = d + 1``) and dual (VJP, ``q = 5000``) at
  ``N = 1e4, d = 10, M = 500``; ``cross_hessian_rows`` at the same size;
- ``cc_gram`` at ``N = 1e5, d = 10, M = 1000``, with two matmuls of the same FLOP count
  (``2 M² N d``) on the same device: ``A @ A.T`` with ``A`` ``(M, N d)`` in one piece, and the
  sum of ``cc_gram``'s own chunk products (no kernel evaluation);
- memory of that ``cc_gram`` call: the process's peak RSS (``resource.getrusage``), its rise
  during the call, the peak NumPy allocation traced by ``tracemalloc`` (NumPy-based backends)
  and the GPU peak (``torch.cuda.max_memory_allocated`` / CuPy's pool).

The last thing printed is a short table of the issue's targets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import _backends, _problems
else:
    from . import _backends, _problems

Size = _problems.Size

#: The two problem sizes of each ``--sizes`` and the dual regime's ``q``.
SIZES = {
    "full": {"target": _problems.TARGET, "large": _problems.LARGE, "q": _problems.DUAL_Q, "budget": 6.0},
    "quick": {"target": Size(1_000, 10, 50), "large": Size(5_000, 10, 100), "q": 500, "budget": 1.0},
}

GOALS = {"speedup": 20.0, "cc_over_matmul": 2.0, "host_peak_bytes": 1e9}


CASES = ("cc_gram", "matmul_chunked", "matmul_dense", "kwng_primal", "kwng_dual", "rows")


def case_list(sizes: str, only=None):
    """(key, label, builder, size, extra keyword arguments) of the cases, in run order.

    ``only``: the keys to keep (default: all of :data:`CASES`).
    """
    s = SIZES[sizes]
    target, large = s["target"], s["large"]
    cases = [
        # the memory case first: the process's peak RSS is a high-water mark
        ("cc_gram", "cc_gram (chunked C Cᵀ)", _problems.cc_gram_case, large, {}),
        ("matmul_chunked", "matmul, cc_gram's chunks (same FLOPs)", _problems.matmul_chunked_case,
         large, {}),
        ("matmul_dense", "matmul A Aᵀ, A (M, N d) (same FLOPs)", _problems.matmul_dense_case, large, {}),
        ("kwng_primal", "kwng_direction primal (q = d+1)", _problems.kwng_primal_case, target, {}),
        ("kwng_dual", f"kwng_direction dual (q = {s['q']})", _problems.kwng_dual_case, target,
         {"q": s["q"]}),
        ("rows", "cross_hessian_rows (M, N, d)", _problems.cross_hessian_rows_case, target, {}),
    ]
    return [c for c in cases if only is None or c[0] in only]


# -- the worker: one backend ------------------------------------------------------------------


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(fn, budget: float, max_repeats: int) -> dict:
    """One warm-up call, then ``1 <= k <= max_repeats`` timed calls within ``budget`` seconds."""
    start = time.perf_counter()
    fn()
    warm = time.perf_counter() - start
    k = max(1, min(max_repeats, int(budget / max(warm, 1e-6))))
    times = []
    for _ in range(k):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "times": times, "warmup": warm}


def _memory_first_call(be, fn) -> tuple[dict, dict]:
    """Warm-up call of the memory case with memory readings; returns (memory, timing)."""
    if be.is_gpu:  # load the BLAS library and the context before the baseline
        tiny = be.asarray([[1.0, 2.0], [3.0, 4.0]])
        _ = tiny @ tiny.T
        be.sync()
    be.reset_peak_memory()
    base = _maxrss_bytes()
    traced = be.name in ("numpy", "array_api_strict")
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    fn()
    warm = time.perf_counter() - start
    peak_traced = tracemalloc.get_traced_memory()[1] if traced else None
    if traced:
        tracemalloc.stop()
    peak = _maxrss_bytes()
    memory = {"host_peak": peak, "host_rise": peak - base, "traced_peak": peak_traced,
              "gpu_peak": be.peak_memory()}
    return memory, {"warmup_with_tracing": warm}


def run_backend(name: str, sizes: str, dtype: str, budget: float, max_repeats: int,
                dense_limit: float, only=None) -> dict:
    """Every case on one backend; a JSON-able dict (``skipped`` holds reasons)."""
    out = {"backend": name, "results": {}, "skipped": {}, "memory": None}
    try:
        be = _backends.get(name)
    except NotImplementedError as exc:
        out["unavailable"] = str(exc)
        return out
    for key, _label, build, size, extra in case_list(sizes, only):
        if key == "matmul_dense":
            extra = {**extra, "limit": dense_limit}
        t0 = time.perf_counter()
        try:
            fn = build(be, size, dtype, **extra)
            if key == "cc_gram":
                out["memory"], _ = _memory_first_call(be, fn)
            res = measure(fn, budget, max_repeats)
        except NotImplementedError as exc:
            out["skipped"][key] = str(exc)
            _log(f"[{name}] {key} {size.label}: skipped ({exc})")
            continue
        finally:
            fn = None
        res["size"] = size.label
        out["results"][key] = res
        _log(f"[{name}] {key} {size.label}: median {res['median']:.4g} s over {len(res['times'])} "
             f"(warm-up {res['warmup']:.3g} s; {time.perf_counter() - t0:.1f} s in all)")
    return out


# -- the parent: one process per backend, then the tables ------------------------------------


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": " ".join(f"{k}={os.environ[k]}" for k in _THREAD_VARS if k in os.environ)}
    import numpy

    info["numpy"] = numpy.__version__
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except ImportError:
        pass
    return info


def _spawn(name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--sizes", args.sizes,
           "--dtype", args.dtype, "--budget", str(args.budget), "--repeats", str(args.repeats),
           "--dense-limit-gib", str(args.dense_limit_gib), "--cases", ",".join(args.cases)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return {"backend": name, "results": {}, "skipped": {}, "memory": None,
                "error": f"worker exited with status {proc.returncode}"}
    return json.loads(lines[-1])


def _fmt_s(t: float | None) -> str:
    if t is None:
        return "—"
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def _mib(b) -> str:
    return "—" if b is None else f"{b / 2**20:,.0f}"


def render(runs: list[dict], args, machine: dict, command: str) -> tuple[str, str]:
    """The markdown document and the short targets table."""
    names = [r["backend"] for r in runs]
    by = {r["backend"]: r for r in runs}
    base = by.get("numpy", {}).get("results", {})
    lines = [
        "# wngkernels: backend timings (`benchmarks/run_table.py`)",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- command: `{command}`",
        f"- machine: {machine.get('cpus')} CPUs ({machine.get('cpu')}), {machine.get('gpu', 'no GPU')}; "
        f"{machine.get('platform')}",
        f"- software: Python {machine.get('python')}, NumPy {machine.get('numpy')}, "
        f"torch {machine.get('torch', '—')}, CuPy {machine.get('cupy', '—')}"
        + (f"; {machine['threads']}" if machine.get("threads") else ""),
        f"- dtype {args.dtype}; median of up to {args.repeats} calls after one warm-up "
        f"(budget {args.budget:g} s per case); ×NumPy = NumPy's time / this backend's time",
        "",
    ]
    for r in runs:
        for why in (r.get("unavailable"), r.get("error")):
            if why:
                lines.append(f"- {r['backend']}: not measured: {why}")
    lines += ["", "## Time", "", "| case | size | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    for key, label, _, size, _extra in case_list(args.sizes, args.cases):
        cells = []
        for n in names:
            res = by[n]["results"].get(key)
            if res is None:
                cells.append("skipped" if key in by[n]["skipped"] else "—")
                continue
            ratio = base.get(key, {}).get("median")
            speed = f" ({ratio / res['median']:.3g}×)" if ratio else ""
            cells.append(_fmt_s(res["median"]) + speed)
        lines.append(f"| {label} | {size.label} | " + " | ".join(cells) + " |")

    large = SIZES[args.sizes]["large"]
    gflop = large.cc_flops / 1e9
    if any("cc_gram" in r["results"] for r in runs):
        lines += _cc_section(names, by, large, gflop)
    if any(r.get("memory") for r in runs):
        lines += _memory_section(names, by, large)
    short = targets(runs, args)
    lines += ["", "## Targets (issue 6)", "", short, ""]
    return "\n".join(lines), short


def _cc_section(names, by, large, gflop) -> list[str]:
    lines = ["", f"## C Cᵀ against a matmul of the same FLOP count ({large.label}, "
              f"2 M² N d = {gflop:,.0f} GFLOP)", "",
              "| backend | cc_gram | matmul, same chunks | matmul, dense | cc_gram / dense | "
              "cc_gram / chunks | cc_gram GFLOP/s | dense GFLOP/s |", "|---|---|---|---|---|---|---|---|"]
    for n in names:
        res = by[n]["results"]
        cc, ch, de = (res.get(k, {}).get("median") for k in ("cc_gram", "matmul_chunked", "matmul_dense"))
        if cc is None:
            continue
        lines.append("| " + " | ".join([
            n, _fmt_s(cc), _fmt_s(ch), _fmt_s(de),
            f"{cc / de:.2f}" if de else "—", f"{cc / ch:.2f}" if ch else "—",
            f"{gflop / cc:.3g}", f"{gflop / de:.3g}" if de else "—"]) + " |")
    return lines


def _memory_section(names, by, large) -> list[str]:
    lines = ["", f"## Memory of one cc_gram call ({large.label}, MiB)", "",
              "| backend | host peak RSS | host rise during the call | NumPy traced peak | GPU peak |",
              "|---|---|---|---|---|"]
    for n in names:
        mem = by[n].get("memory")
        if mem:
            lines.append(f"| {n} | {_mib(mem['host_peak'])} | {_mib(mem['host_rise'])} | "
                         f"{_mib(mem['traced_peak'])} | {_mib(mem['gpu_peak'])} |")
    return lines


def targets(runs: list[dict], args) -> str:
    """The issue's targets, one row per backend and target."""
    by = {r["backend"]: r for r in runs}
    base = by.get("numpy", {}).get("results", {})
    s = SIZES[args.sizes]
    rows = ["| target | backend | measured | goal | met |", "|---|---|---|---|---|"]

    def met(ok):
        return "yes" if ok else "**no**"

    for n, r in by.items():
        res = r["results"]
        t_np = base.get("kwng_primal", {}).get("median")
        if n in _backends.GPU_BACKENDS and t_np and "kwng_primal" in res:
            sp = t_np / res["kwng_primal"]["median"]
            rows.append(f"| kwng_direction ×NumPy, {s['target'].label} | {n} | {sp:.3g}× | "
                        f"≥ {GOALS['speedup']:g}× | {met(sp >= GOALS['speedup'])} |")
        cc, de = res.get("cc_gram", {}).get("median"), res.get("matmul_dense", {}).get("median")
        ref = "dense"
        if de is None:
            de, ref = res.get("matmul_chunked", {}).get("median"), "same chunks"
        if cc and de:
            rows.append(f"| cc_gram / matmul ({ref}), {s['large'].label} | {n} | {cc / de:.2f} | "
                        f"≤ {GOALS['cc_over_matmul']:g} | {met(cc / de <= GOALS['cc_over_matmul'])} |")
        mem = r.get("memory")
        if mem and n not in _backends.GPU_BACKENDS:
            peak = mem["host_peak"]
            rows.append(f"| host peak RSS, cc_gram {s['large'].label} | {n} | {peak / 2**20:,.0f} MiB | "
                        f"≤ 1 GB | {met(peak <= GOALS['host_peak_bytes'])} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default=",".join(_backends.BACKENDS),
                   help="comma-separated, from: " + ", ".join(_backends.BACKENDS))
    p.add_argument("--sizes", choices=sorted(SIZES), default="full")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--out", type=Path, help="write the markdown document here")
    p.add_argument("--json", type=Path, help="write the raw measurements here")
    p.add_argument("--budget", type=float,
                   help="seconds of timed calls per case (default: 6 for full, 1 for quick)")
    p.add_argument("--repeats", type=int, default=7, help="most timed calls per case")
    p.add_argument("--dense-limit-gib", type=float, default=16.0,
                   help="skip the dense matmul when A (M, N d) exceeds this")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    p.add_argument("--in-process", action="store_true",
                   help="all backends in this process (host peak RSS is then a high-water mark "
                        "over the backends run before)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = SIZES[args.sizes]["budget"]
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if sorted(set(args.cases) - set(CASES)):
        p.error(f"unknown cases {sorted(set(args.cases) - set(CASES))}; choose from {', '.join(CASES)}")

    if args.worker:
        result = run_backend(args.worker, args.sizes, args.dtype, args.budget, args.repeats,
                             args.dense_limit_gib * 2**30, args.cases)
        print(json.dumps(result))
        return 0

    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = sorted(set(names) - set(_backends.BACKENDS))
    if unknown:
        p.error(f"unknown backends {unknown}; choose from {', '.join(_backends.BACKENDS)}")
    if "numpy" in names:
        names = ["numpy"] + [n for n in names if n != "numpy"]  # the reference first
    command = "python benchmarks/run_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    runs = []
    for name in names:
        t0 = time.perf_counter()
        if args.in_process:
            runs.append(run_backend(name, args.sizes, args.dtype, args.budget, args.repeats,
                                    args.dense_limit_gib * 2**30, args.cases))
        else:
            runs.append(_spawn(name, args))
        _log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")
    doc, short = render(runs, args, _machine(), command.strip())
    if args.out:
        args.out.write_text(doc, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "args": vars(args) | {"out": str(args.out),
                                                                          "json": str(args.json)}},
                                        indent=1, default=str), encoding="utf-8")
    print(doc.split("\n## Targets")[0])
    print(f"\ntotal {time.perf_counter() - start:.1f} s\n")
    print(short)
    return 0


if __name__ == "__main__":
    sys.exit(main())

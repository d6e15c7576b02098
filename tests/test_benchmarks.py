"""The asv suite stays valid and runnable: ``asv check``, one call of every benchmark, run_table.

``asv check`` is skipped where asv is not installed, unless ``WNGKERNELS_REQUIRE_ASV=1`` (set
by CI), where it fails.

Timings are never asserted: these tests catch a benchmark that no longer imports, no longer
matches the API, or fails on the smallest size.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _backends, _problems, run_table  # noqa: E402

MODULES = ("benchmarks.bench_kernels", "benchmarks.bench_estimator", "benchmarks.bench_torch")
PREFIXES = ("time_", "peakmem_", "track_", "mem_", "timeraw_")


def _benchmarks(prefixes=PREFIXES):
    """(module, class, method name) of every benchmark method of the suite's modules."""
    found = []
    for mod_name in MODULES:
        module = importlib.import_module(mod_name)
        for cls_name, cls in vars(module).items():
            if cls_name.startswith("_") or not inspect.isclass(cls) or cls.__module__ != mod_name:
                continue
            for name, _ in inspect.getmembers(cls, inspect.isfunction):
                if name.startswith(prefixes):
                    found.append((mod_name, cls_name, name))
    return found


def _smallest_params(cls):
    """One parameter tuple: NumPy (else the first backend available here), then each first value."""
    params = getattr(cls, "params", [])
    if params and not isinstance(params[0], list):
        params = [params]
    chosen = []
    for name, values in zip(getattr(cls, "param_names", []), params, strict=False):
        if name == "backend":
            ok = [v for v in values if _backends.unavailable_reason(v) is None]
            if not ok:
                pytest.skip(f"no backend of {values} is available here")
            chosen.append("numpy" if "numpy" in ok else ok[0])
        else:
            chosen.append(values[0])
    return tuple(chosen)


def _run_once(mod_name, cls_name, method):
    cls = getattr(importlib.import_module(mod_name), cls_name)
    args = _smallest_params(cls)
    bench = cls()
    try:
        if hasattr(bench, "setup"):
            bench.setup(*args)
    except NotImplementedError as exc:
        pytest.skip(f"setup skipped {args}: {exc}")
    try:
        return getattr(bench, method)(*args)
    finally:
        if hasattr(bench, "teardown"):
            bench.teardown(*args)


def test_asv_check():
    if importlib.util.find_spec("asv") is None:
        reason = "asv is not installed (pip install -e '.[test]')"
        if os.environ.get("WNGKERNELS_REQUIRE_ASV") == "1":
            pytest.fail(reason + " and WNGKERNELS_REQUIRE_ASV=1")
        pytest.skip(reason)
    proc = subprocess.run(
        [sys.executable, "-m", "asv", "check", "--python=same"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # asv check exits 0 when the suite fails to import: require its success line
    assert "No problems found" in out, out


def test_suite_has_the_issue_benchmarks():
    names = {f"{c}.{m}" for _, c, m in _benchmarks()}
    for want in ("CrossHessianRows.time_cross_hessian_rows", "CrossHessian.time_cross_hessian",
                 "CCGram.time_cc_gram", "KWNGPrimal.time_kwng_direction",
                 "KWNGDual.time_kwng_direction", "PeakMemory.peakmem_cc_gram",
                 "PeakMemory.peakmem_kwng_direction", "Precondition.time_precondition",
                 "GPUMemory.track_cc_gram_gpu_peak_bytes"):
        assert want in names


@pytest.mark.parametrize("sizes", [_problems.ROWS_SIZES, _problems.FULL_SIZES,
                                   _problems.ESTIMATOR_SIZES, _problems.DUAL_SIZES])
def test_sizes_are_listed_smallest_first(sizes):
    work = [s.n * s.d * s.m for s in sizes.values()]
    assert work[0] == min(work)


@pytest.mark.parametrize("bench", _benchmarks(("time_",)), ids=lambda b: f"{b[1]}.{b[2]}")
def test_time_benchmark_runs_once(bench):
    _run_once(*bench)


@pytest.mark.parametrize("bench", _benchmarks(("peakmem_", "track_")), ids=lambda b: f"{b[1]}.{b[2]}")
def test_memory_benchmark_runs_once_on_a_small_problem(bench, monkeypatch):
    monkeypatch.setattr(_problems, "LARGE", _problems.Size(200, 3, 20))
    value = _run_once(*bench)
    if bench[2].startswith("track_"):
        assert isinstance(value, int) and value > 0


def test_max_n_skips_large_sizes(monkeypatch):
    monkeypatch.setenv("WNGKERNELS_BENCH_MAX_N", "1e4")
    with pytest.raises(NotImplementedError, match="WNGKERNELS_BENCH_MAX_N"):
        _problems.check_size(_problems.LARGE)
    _problems.check_size(_problems.TARGET)


def test_unavailable_backend_is_an_asv_skip():
    with pytest.raises(ValueError, match="unknown backend"):
        _backends.get("no-such-backend")
    for name in _backends.BACKENDS:
        reason = _backends.unavailable_reason(name)
        if reason is not None:
            with pytest.raises(NotImplementedError, match=name):
                _backends.get(name)


def test_run_table_writes_the_table(tmp_path, monkeypatch, capsys):
    tiny = {"target": _problems.Size(200, 3, 20), "large": _problems.Size(300, 3, 30), "q": 40,
            "budget": 0.01}
    monkeypatch.setitem(run_table.SIZES, "quick", tiny)
    out = tmp_path / "table.md"
    assert run_table.main(["--backends", "numpy", "--sizes", "quick", "--in-process",
                           "--repeats", "2", "--out", str(out)]) == 0
    doc = out.read_text(encoding="utf-8")
    for heading in ("## Time", "## C Cᵀ against a matmul", "## Memory", "## Targets"):
        assert heading in doc
    assert "| cc_gram (chunked C Cᵀ) | N3e2-d3-M30 | " in doc
    printed = capsys.readouterr().out.rstrip().splitlines()
    header = max(i for i, line in enumerate(printed) if line.startswith("| target |"))
    assert all(line.startswith("|") for line in printed[header:])  # the short table comes last
    assert printed[-1].startswith("| host peak RSS")

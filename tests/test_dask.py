"""The Dask edge (:mod:`wngkernels.dask`) against the NumPy core in float64 (itself tested against
finite differences and dense re-derivations): values to 1e-10, the number of computes per call,
the one pass over the Jacobian, bad input, and one run on a ``dask.distributed`` ``LocalCluster``
of two worker processes."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
from dask.callbacks import Callback  # noqa: E402

import wngkernels as wk  # noqa: E402
import wngkernels.dask as wkd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, D, Q, M = 240, 3, 5, 20
RTOL = 1e-10  # measured: the worst case below agrees to 1.5e-12
CHUNKINGS = {"one": (N,), "even": (60,) * 4, "uneven": (7,) * 34 + (2,), "two": (100, 140),
             "empty-chunks": (0, 100, 0, 140, 0)}
KERNELS = {
    "gauss-fixed": wk.Gaussian(1.5),
    "gauss-authors": wk.Gaussian(wk.AuthorsRule()),
    "gauss-median": wk.Gaussian(wk.MedianHeuristic(100)),
    "rq-fixed": wk.RationalQuadratic(1.5, alpha=0.7),
    "rq-authors": wk.RationalQuadratic(wk.AuthorsRule(log_bandwidth=0.3), alpha=0.7),
    "rq-median": wk.RationalQuadratic(wk.MedianHeuristic(100), alpha=2.0),
}


@pytest.fixture(autouse=True)
def _threads():
    with dask.config.set(scheduler="threads"):
        yield


def _problem(seed=0, offset=5.0):
    """Samples off the origin (the centring matters), a Jacobian, a gradient, a basis."""
    rng = np.random.default_rng(seed)
    x = offset + 2.0 * rng.normal(size=(N, D))
    return x, rng.normal(size=(N, D, Q)), rng.normal(size=Q), wk.nystrom_basis(x, M, rng=seed + 1)


def _lazy(x, jac, chunks):
    return da.from_array(x, chunks=(chunks, D)), da.from_array(jac, chunks=(chunks, D, Q))


def _assert_matches(actual, desired, rtol=RTOL):
    assert isinstance(actual, da.Array), type(actual)
    assert actual.dtype == desired.dtype and actual.shape == desired.shape
    assert actual.numblocks == (1,) * actual.ndim
    got = actual.compute()
    err = np.linalg.norm(got - desired) / np.linalg.norm(desired)
    assert err < rtol, err


class _Counter(Callback):
    """Counts ``dask.compute`` calls on the local schedulers (one ``_start`` per call)."""

    def __init__(self):
        super().__init__()
        self.computes = 0

    def _start(self, dsk):
        self.computes += 1


# -- values against the core ---------------------------------------------------------------------


@pytest.mark.parametrize(("lam", "damping"), list(itertools.product((0.0, 1e-3), ("identity", "jacobian"))))
@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("kname", KERNELS)
def test_kwng_direction_matches_core(kname, chunking, lam, damping):
    x, jac, g, basis = _problem()
    xs, js = _lazy(x, jac, CHUNKINGS[chunking])
    kw = dict(kernel=KERNELS[kname], basis=basis, eps=1e-3, lam=lam, damping=damping)
    _assert_matches(wkd.kwng_direction(g, xs, jacobian=js, **kw), wk.kwng_direction(g, x, jacobian=jac, **kw))


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("kname", KERNELS)
def test_building_blocks_match_core(kname, chunking):
    x, jac, g, basis = _problem(seed=3)
    xs, js = _lazy(x, jac, CHUNKINGS[chunking])
    kw = dict(kernel=KERNELS[kname], basis=basis)
    _assert_matches(wkd.cc_gram(xs, **kw), wk.cc_gram(x, **kw))
    _assert_matches(wkd.t_matrix(xs, jacobian=js, **kw), wk.t_matrix(x, jacobian=jac, **kw))
    for lam in (0.0, 1e-2):
        _assert_matches(wkd.metric_apply(g, xs, jacobian=js, lam=lam, **kw),
                        wk.metric_apply(g, x, jacobian=jac, lam=lam, **kw))


def test_dask_vectors_damping_array_chunk_size_and_forms():
    x, jac, g, basis = _problem(seed=4)
    xs, js = _lazy(x, jac, CHUNKINGS["uneven"])
    dmp = np.linspace(0.5, 2.0, Q)
    kw = dict(kernel=wk.Gaussian(wk.AuthorsRule()), basis=basis, eps=1e-3, lam=1e-4)
    want = wk.kwng_direction(g, x, jacobian=jac, damping=dmp, **kw)
    for grad, damping in ((da.from_array(g, chunks=2), da.from_array(dmp, chunks=3)), (g, dmp)):
        _assert_matches(wkd.kwng_direction(grad, xs, jacobian=js, damping=damping, chunk_size=3, **kw), want)
    for form in ("primal", "dual", "dual-qr"):
        _assert_matches(wkd.kwng_direction(g, xs, jacobian=js, form=form, **kw),
                        wk.kwng_direction(g, x, jacobian=jac, form=form, **kw))
    _assert_matches(wkd.metric_apply(da.from_array(g), xs, jacobian=js, kernel=kw["kernel"], basis=basis),
                    wk.metric_apply(g, x, jacobian=jac, kernel=kw["kernel"], basis=basis))


@pytest.mark.parametrize("bandwidth", [0.05, 0.25])
def test_far_samples_take_the_rows(bandwidth):
    """Samples beyond the expansion's radius (EXPANSION_RADIUS bandwidths): the core takes C Cᵀ
    from the rows; each block decides for its own samples (0.25: some blocks do, some do not)."""
    x, jac, g, basis = _problem(seed=5)
    xs, js = _lazy(x, jac, CHUNKINGS["even"])
    kw = dict(kernel=wk.RationalQuadratic(bandwidth, alpha=1.0), basis=basis)
    _assert_matches(wkd.cc_gram(xs, **kw), wk.cc_gram(x, **kw))
    _assert_matches(wkd.kwng_direction(g, xs, jacobian=js, eps=1e-3, **kw),
                    wk.kwng_direction(g, x, jacobian=jac, eps=1e-3, **kw))


def test_float32_and_integer_samples_follow_the_core():
    x, jac, g, basis = _problem(seed=6)
    kw = dict(kernel=wk.Gaussian(wk.AuthorsRule()), basis=basis, eps=1e-2)
    x32, j32, g32 = (a.astype(np.float32) for a in (x, jac, g))
    xs, js = _lazy(x32, j32, CHUNKINGS["two"])
    truth = wk.kwng_direction(g, x, jacobian=jac, **kw)  # float64
    core32 = wk.kwng_direction(g32, x32, jacobian=j32, **kw)
    w = wkd.kwng_direction(g32, xs, jacobian=js, **kw)
    assert w.dtype == np.float32 and w.shape == (Q,)
    # rounding in float32 (sums in another order): as far from the float64 truth as the core's is
    # (measured: 1.5e-4 here, the core's float32 5.6e-4)
    err, err_core = (float(np.linalg.norm(a - truth) / np.linalg.norm(truth)) for a in (w.compute(), core32))
    assert err < max(4 * err_core, 1e-4), (err, err_core)
    xi = np.round(x).astype(np.int64)
    xs, js = _lazy(xi, jac, CHUNKINGS["two"])
    want = wk.kwng_direction(g, xi, jacobian=jac, **kw)
    _assert_matches(wkd.kwng_direction(g, xs, jacobian=js, **kw), want)


def test_close_to_the_exact_natural_gradient():
    """On the Gaussian model the direction approaches G_W⁻¹ g (as the core's does)."""
    from wngkernels.models import GaussianModel

    model = GaussianModel(d=2)
    theta, z = model.default_theta(), model.sample_latent(2000, rng=0)
    g = np.array([1.0, -1.0, 2.0])
    xs = da.from_array(model.h(theta, z), chunks=(300, 2))
    js = da.from_array(model.jacobian(theta, z), chunks=(300, 2, 3))
    w = wkd.kwng_direction(g, xs, kernel=wk.Gaussian(wk.AuthorsRule()), basis=wk.nystrom_basis(xs, 90, rng=1),
                           eps=1e-5, jacobian=js).compute()
    exact = model.natural_gradient(theta, g)
    assert np.linalg.norm(w - exact) / np.linalg.norm(exact) < 0.1


# -- computes per call ---------------------------------------------------------------------------


def _counted_inputs(x, jac, chunks):
    """Samples and Jacobian computed by ``map_blocks`` from one latent array, with a count of the
    blocks of each that are evaluated (thread-safe)."""
    calls = {"samples": 0, "jacobian": 0}
    lock = threading.Lock()

    def counted(name, a):
        def block(idx, block_info=None):
            with lock:
                calls[name] += 1
            lo, hi = block_info[None]["array-location"][0]
            return a[lo:hi]
        return block

    idx = da.arange(N, chunks=chunks)
    # meta given: map_blocks does not call the function to infer it
    xs = idx.map_blocks(counted("samples", x), new_axis=1, chunks=(chunks, D), meta=np.empty((0, 0)))
    js = idx.map_blocks(counted("jacobian", jac), new_axis=(1, 2), chunks=(chunks, D, Q),
                        meta=np.empty((0, 0, 0)))
    return xs, js, calls


@pytest.mark.parametrize("chunking", ["one", "uneven"])
def test_two_computes_per_call_and_one_pass_over_the_jacobian(chunking):
    x, jac, g, basis = _problem(seed=7)
    chunks = CHUNKINGS[chunking]
    kw = dict(kernel=wk.Gaussian(wk.MedianHeuristic(50)), basis=basis)
    calls = {
        "kwng_direction": lambda xs, js: wkd.kwng_direction(da.from_array(g), xs, jacobian=js, eps=1e-3,
                                                            damping=da.from_array(np.ones(Q)), **kw),
        "metric_apply": lambda xs, js: wkd.metric_apply(da.from_array(g), xs, jacobian=js, lam=1e-3, **kw),
        "t_matrix": lambda xs, js: wkd.t_matrix(xs, jacobian=js, **kw),
        "cc_gram": lambda xs, js: wkd.cc_gram(xs, **kw),
    }
    for name, call in calls.items():
        xs, js, evaluated = _counted_inputs(x, jac, chunks)
        with _Counter() as counter:
            result = call(xs, js)
        assert counter.computes == 2, (name, counter.computes)
        # each block of the Jacobian once; of the samples once per compute (the first pass
        # reads them for their statistics, the basis points and the median's rows)
        assert evaluated["jacobian"] == (0 if name == "cc_gram" else len(chunks)), (name, evaluated)
        assert evaluated["samples"] == 2 * len(chunks), (name, evaluated)
        with _Counter() as counter:
            result.compute()  # already computed: no pass over the samples
        assert evaluated["samples"] == 2 * len(chunks)


# -- bad input -----------------------------------------------------------------------------------


def _bad_cases():
    x, jac, g, basis = _problem(seed=8)
    xs, js = _lazy(x, jac, CHUNKINGS["even"])
    kw = dict(kernel=wk.Gaussian(1.0), basis=basis, eps=1e-3)
    nan_x, nan_j = x.copy(), jac.copy()
    nan_x[130, 1] = np.nan
    nan_j[200, 0, 2] = np.inf
    unknown = xs[xs[:, 0] > -np.inf]
    return {
        "numpy samples": (dict(samples=x), TypeError, r"samples must be a dask.array.Array .* use the core"),
        "numpy jacobian": (dict(jacobian=jac), TypeError, "jacobian must be a dask.array.Array"),
        "torch-like grad": (dict(grad=[1.0] * Q), TypeError, "grad must be a NumPy or Dask array"),
        "grad 2-D": (dict(grad=g[None, :]), ValueError, r"grad must be 1-D \(q,\)"),
        "q mismatch": (dict(grad=g[:-1]), ValueError, "jacobian's last axis must match grad"),
        "samples 1-D": (dict(samples=xs[:, 0]), ValueError, r"samples must be 2-D \(N, d\)"),
        "samples chunked along d": (dict(samples=xs.rechunk((60, 1))), ValueError,
                                    r"samples must be chunked along N only .*rechunk\(\{1: -1\}\)"),
        "jacobian chunked along q": (dict(jacobian=js.rechunk((60, 3, 2))), ValueError,
                                     "jacobian must be chunked along N only"),
        "chunks differ": (dict(jacobian=js.rechunk((80, 3, 5))), ValueError,
                          "jacobian must have the chunks of samples along N"),
        "jacobian shape": (dict(jacobian=js[:, :2]), ValueError, r"jacobian must have shape \(N, d, q\)"),
        "unknown chunks": (dict(samples=unknown), ValueError, "samples must have known chunk sizes"),
        "vjp": (dict(vjp=lambda c: c), ValueError, "vjp is not supported on Dask arrays"),
        "no jacobian": (dict(jacobian=None), ValueError, "pass jacobian"),
        "damping name": (dict(damping="jacobians"), ValueError, "damping must be 'identity', 'jacobian'"),
        "damping list": (dict(damping=[1.0] * Q), TypeError, "damping must be a NumPy or Dask array"),
        "rule": (dict(kernel=wk.Gaussian(lambda y, x: 1.0)), TypeError, "not supported on Dask arrays"),
        "eps": (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
        "basis": (dict(basis=wk.NystromBasis([N], [0])), ValueError, "basis indices must be < N"),
        "chunk_size": (dict(chunk_size=0), ValueError, "chunk_size must be an int >= 1"),
        "nan samples": (dict(samples=da.from_array(nan_x, chunks=(60, D))), ValueError,
                        "samples must be finite; it contains NaN or Inf"),
        "nan grad": (dict(grad=da.from_array(np.where(np.arange(Q) == 1, np.nan, g))), ValueError,
                     "grad must be finite"),
        "inf jacobian": (dict(jacobian=da.from_array(nan_j, chunks=(60, D, Q))), ValueError,
                         "jacobian must be finite; it contains NaN or Inf"),
    }, dict(grad=g, samples=xs, jacobian=js, **kw)


_CASES, _GOOD = _bad_cases()
#: Refused after the samples' pass (their values), or after the Jacobian's (its values).
_COMPUTES = {"nan samples": 1, "nan grad": 1, "inf jacobian": 2}


@pytest.mark.parametrize("case", _CASES)
def test_bad_input_is_refused_naming_the_argument(case):
    change, exc, match = _CASES[case]
    kw = {**_GOOD, **change}
    with _Counter() as counter, pytest.raises(exc, match=match):
        wkd.kwng_direction(kw.pop("grad"), kw.pop("samples"), **kw)
    assert counter.computes == _COMPUTES.get(case, 0), counter.computes  # shapes and types: no compute


def test_the_core_points_dask_arrays_to_the_edge():
    x, jac, g, basis = _problem()
    xs, js = _lazy(x, jac, CHUNKINGS["even"])
    with pytest.raises(TypeError, match=r"samples is a Dask array.*use wngkernels\.dask"):
        wk.kwng_direction(g, xs, kernel=wk.Gaussian(1.0), basis=basis, eps=1e-3, jacobian=js)
    with pytest.raises(TypeError, match=r"x is a Dask array"):
        wk.Gaussian(1.0)(xs, x)


def test_without_dask_the_import_names_the_extra():
    code = ("import sys; sys.modules['dask'] = None\n"
            "try:\n    import wngkernels.dask\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert 'pip install -c constraints.txt -e ".[dask]"' in out


# -- dask.distributed -----------------------------------------------------------------------------

_CLUSTER_JOB = textwrap.dedent("""
    import json

    import dask.array as da
    import numpy as np
    from dask.distributed import Client, LocalCluster, get_task_stream

    import wngkernels as wk
    import wngkernels.dask as wkd

    if __name__ == "__main__":
        rng = np.random.default_rng(0)
        n, d, q = 400, 3, 4
        x = 3.0 + rng.normal(size=(n, d))
        jac, g = rng.normal(size=(n, d, q)), rng.normal(size=q)
        kw = dict(kernel=wk.Gaussian(wk.AuthorsRule()), basis=wk.nystrom_basis(x, 30, rng=1),
                  eps=1e-3, lam=1e-4, damping="jacobian")
        want = wk.kwng_direction(g, x, jacobian=jac, **kw)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          host="127.0.0.1") as cluster, Client(cluster) as client:
            xs = da.from_array(x, chunks=(90, d))
            js = da.from_array(jac, chunks=(90, d, q))
            with get_task_stream(client) as tasks:
                w = wkd.kwng_direction(g, xs, jacobian=js, **kw).compute()
            workers = sorted({t["worker"] for t in tasks.data})
        err = float(np.linalg.norm(w - want) / np.linalg.norm(want))
        print(json.dumps({"err": err, "tasks": len(tasks.data), "workers": len(workers)}))
""")


def test_local_cluster_of_two_processes(tmp_path):
    """The same direction on a LocalCluster of two worker processes (the functions and the shared
    frame travel by pickle). In a subprocess, killed with its workers after 180 s: it cannot hang."""
    script = tmp_path / "cluster_job.py"
    script.write_text(_CLUSTER_JOB, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the job's session: its scheduler and workers
        proc.communicate()
        pytest.fail("the LocalCluster job did not finish in 180 s")
    assert proc.returncode == 0, err[-4000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["err"] < RTOL, result
    assert result["tasks"] > 0 and result["workers"] >= 1, result  # it ran on the cluster


# -- the memory benchmark --------------------------------------------------------------------------


def test_memory_benchmark_runs_and_validates_its_arguments(capsys):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import dask_memory
    finally:
        sys.path.remove(str(ROOT))
    dask_memory.main(["--n", "6e2", "--d", "3", "--m", "20", "--chunk", "250"])
    table = capsys.readouterr().out.splitlines()
    rows = [line for line in table if line.startswith("| 600 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["dask", "numpy"], table
    assert all(float(r.split("|")[-2]) < 1e-10 for r in rows), rows  # the two modes agree
    for bad in (["--n", "0"], ["--n", "1.5"], ["--chunk", "x"], ["--n", "10", "--m", "31", "--d", "3"],
                ["--max-numpy-gib", "-1"]):
        with pytest.raises(SystemExit):
            dask_memory.main(bad)
        assert "error" in capsys.readouterr().err

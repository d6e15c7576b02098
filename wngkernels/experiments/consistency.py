r"""Consistency: the KWNG estimate against the closed-form natural gradient.

For the seed's synthetic models (``X = a + rZ`` with ``Z`` Gaussian or uniform on the sphere),
``G_W`` is known in closed form, so the relative error

.. math:: \frac{\lVert w - G_W^{-1} g\rVert}{\lVert G_W^{-1} g\rVert}

of the estimate ``w`` (:func:`wngkernels.kwng_direction`) can be measured exactly. Two sweeps:

- **versus N** for several ``d``, with the experiments' basis size ``M = ⌊d √N⌋``;
- **versus M** at a fixed ``N`` and ``d``.

Each point is repeated over seeds (fresh latent samples, parameter ``θ = (a, r)``, gradient
``g`` and basis); the plots show the median and the interquartile band on log–log axes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .. import AuthorsRule, Gaussian, kwng_direction, nystrom_basis
from ..models import GaussianModel, HypersphereModel
from . import _io

__all__ = ["Config", "PRESETS", "basis_size", "relative_error", "run"]

MODELS = {"gaussian": GaussianModel, "hypersphere": HypersphereModel}


@dataclass(frozen=True)
class Config:
    """Sizes of one consistency run.

    Attributes
    ----------
    models : tuple of str
        Among ``"gaussian"``, ``"hypersphere"``.
    dims : tuple of int
        Dimensions ``d`` of the N-sweep.
    sizes : tuple of int
        Sample sizes ``N`` of the N-sweep.
    m_dim, m_size : int
        ``d`` and ``N`` of the M-sweep.
    m_values : tuple of int
        Basis sizes ``M`` of the M-sweep.
    seeds : int
        Repetitions per point.
    eps, lam : float
        Damping and RKHS regularisation of the estimator.
    """

    models: tuple[str, ...]
    dims: tuple[int, ...]
    sizes: tuple[int, ...]
    m_dim: int
    m_size: int
    m_values: tuple[int, ...]
    seeds: int
    eps: float = 1e-6
    lam: float = 0.0


PRESETS = {
    "full": Config(("gaussian", "hypersphere"), (2, 5, 10), (100, 250, 500, 1000, 2000, 4000),
                   m_dim=5, m_size=2000, m_values=(6, 12, 25, 50, 100, 200, 400, 800), seeds=8),
    "quick": Config(("gaussian", "hypersphere"), (2, 5), (100, 300, 1000, 3000),
                    m_dim=5, m_size=1000, m_values=(6, 12, 25, 50, 100, 200), seeds=5),
    "tiny": Config(("gaussian", "hypersphere"), (2,), (100, 1000), m_dim=2, m_size=300,
                   m_values=(3, 8, 34), seeds=3),
}


def basis_size(d: int, n: int) -> int:
    """The experiments' Nyström size ``M = ⌊d √N⌋``, kept within ``[1, N d]``."""
    return max(1, min(int(d * math.sqrt(n)), n * d))


def relative_error(model, n: int, m: int, rng: np.random.Generator, arrays: _io.Arrays, *, kernel,
                   eps: float, lam: float) -> float:
    """One draw of ``‖w − G_W⁻¹g‖ / ‖G_W⁻¹g‖``.

    Parameters
    ----------
    model : GaussianModel or HypersphereModel
    n, m : int
        Samples ``N`` and basis size ``M``.
    rng : numpy.random.Generator
        Source of ``θ = (a, r)`` (``a ~ N(0, I)``, ``r ~ U(0.5, 2)``), ``g ~ N(0, I)``, the
        latent samples and the basis.
    arrays : Arrays
        Backend the estimator runs on (inputs are converted once).
    kernel : Kernel
    eps, lam : float

    Returns
    -------
    float
    """
    d = model.d
    theta = np.concatenate([rng.standard_normal(d), rng.uniform(0.5, 2.0, size=1)])
    grad = rng.standard_normal(model.num_params)
    z = model.sample_latent(n, rng=rng)
    basis = nystrom_basis((n, d), m, rng=rng)
    theta, grad, z = arrays.asarray(theta), arrays.asarray(grad), arrays.asarray(z)
    w = kwng_direction(grad, model.h(theta, z), kernel=kernel, basis=basis, eps=eps, lam=lam,
                       jacobian=model.jacobian(theta, z))
    return arrays.rel_error(w, model.natural_gradient(theta, grad))


def _jobs(cfg: Config):
    for name in cfg.models:
        for d in cfg.dims:
            for n in cfg.sizes:
                yield "N", name, d, n, basis_size(d, n)
        for m in cfg.m_values:
            yield "M", name, cfg.m_dim, cfg.m_size, min(m, cfg.m_size * cfg.m_dim)


def run(*, size: str = "full", backend: str = "numpy", device: str | None = None, seed: int = 0,
        out=None, show_progress: bool = True, verbose: bool = True) -> _io.Result:
    """Run the consistency experiment; write ``consistency.csv`` and two PNGs into ``out``.

    Parameters
    ----------
    size : {"full", "quick", "tiny"}
        Preset of :data:`PRESETS` (``"tiny"`` is for the tests).
    backend : {"numpy", "torch", "cupy"}
    device : str, optional
    seed : int
        Base seed; repetition ``r`` uses seed ``seed + r``.
    out : path-like
        Output directory (created).
    show_progress, verbose : bool
        tqdm bar; print the summary table.

    Returns
    -------
    Result
        Rows with ``sweep, model, d, N, M, eps, lam, kernel, log_bandwidth, seed, rel_error,
        seconds``.
    """
    cfg = _io.check_size(size, PRESETS)
    arrays = _io.Arrays(backend, device)
    path = _io.out_dir(out)
    kernel = Gaussian(AuthorsRule(0.0))
    jobs = [(*job, seed + r) for job in _jobs(cfg) for r in range(cfg.seeds)]
    rows = []
    for sweep, name, d, n, m, s in _io.progress(jobs, desc="consistency", enabled=show_progress):
        model = MODELS[name](d)
        rng = np.random.default_rng([s, d, n, m, list(MODELS).index(name)])
        start = time.perf_counter()
        err = relative_error(model, n, m, rng, arrays, kernel=kernel, eps=cfg.eps, lam=cfg.lam)
        rows.append({"sweep": sweep, "model": name, "d": d, "N": n, "M": m, "eps": cfg.eps,
                     "lam": cfg.lam, "kernel": "gaussian", "log_bandwidth": 0.0, "seed": s,
                     "backend": backend, "rel_error": err, "seconds": time.perf_counter() - start})
    files = [_io.write_csv(path / "consistency.csv", rows)]
    summary = _io.summarise([r for r in rows if r["sweep"] == "N"], ("model", "d", "N", "M"), "rel_error")
    slopes = _slopes(summary)
    text = "\n\n".join([
        _io.format_table(summary, title="consistency: relative error vs N (M = floor(d sqrt N))"),
        _io.format_table(slopes, title="log-log slope of the median error in N"),
        _io.format_table(_io.summarise([r for r in rows if r["sweep"] == "M"], ("model", "d", "N", "M"),
                                       "rel_error"),
                         title=f"consistency: relative error vs M (N = {cfg.m_size})"),
    ])
    files += plot(rows, path)
    if verbose:
        print(text)
    return _io.Result("consistency", rows, summary + slopes, files, text)


def _slopes(summary):
    out = []
    for (name, d), members in _io.group(summary, ("model", "d")).items():
        out.append({"model": name, "d": d, "slope": _io.loglog_slope([r["N"] for r in members],
                                                                      [r["median"] for r in members])})
    return out


def plot(rows, path):
    """``consistency_vs_N.png`` (one panel per model, a line per d) and ``consistency_vs_M.png``."""
    plt = _io.pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.6), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], models, strict=True):
        sub = [r for r in rows if r["sweep"] == "N" and r["model"] == name]
        for d, members in _io.group(sub, ("d",)).items():
            by_n = {k[0]: [r["rel_error"] for r in v] for k, v in _io.group(members, ("N",)).items()}
            _io.band(ax, sorted(by_n), by_n, label=f"d = {d[0]}")
        if sub:
            ns = sorted({r["N"] for r in sub})
            ref = np.array(ns, dtype=float) ** -0.5
            top = _io.quantiles(r["rel_error"] for r in sub if r["N"] == ns[0])[1]
            ax.plot(ns, ref / ref[0] * top, "k:", lw=1, label=r"$\propto N^{-1/2}$")
        ax.set(xscale="log", yscale="log", xlabel="N (samples), M = ⌊d√N⌋", title=f"{name}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("relative error ‖w − G⁻¹g‖ / ‖G⁻¹g‖")
    files = [_io.save_figure(fig, path / "consistency_vs_N.png")]
    sub = [r for r in rows if r["sweep"] == "M"]
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for name, members in _io.group(sub, ("model",)).items():
        by_m = {k[0]: [r["rel_error"] for r in v] for k, v in _io.group(members, ("M",)).items()}
        _io.band(ax, sorted(by_m), by_m, label=name[0])
    if sub:
        ax.set_title(f"d = {sub[0]['d']}, N = {sub[0]['N']}")
    ax.set(xscale="log", yscale="log", xlabel="M (Nyström basis size)", ylabel="relative error")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    files.append(_io.save_figure(fig, path / "consistency_vs_M.png"))
    return files

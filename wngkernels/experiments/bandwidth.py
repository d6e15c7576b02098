r"""Kernel sensitivity: KWNG's error versus the bandwidth, Gaussian versus rational-quadratic kernel.

The bandwidth follows the authors' rule (:class:`wngkernels.AuthorsRule`):
``ℓ² = 10^{log_bandwidth} · mean ‖Y_m − X_n‖²``, swept over ``log_bandwidth`` for several
``N`` on the seed's Gaussian model ``X = a + rZ`` (closed form ``G_W = diag(I_d, d)``), with
``M = ⌊d √N⌋``. The same sweep with the rational-quadratic kernel (``α = 1``) is the seed's
kernel ablation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .. import AuthorsRule, Gaussian, RationalQuadratic
from . import _io
from .consistency import MODELS, basis_size, relative_error

__all__ = ["Config", "KERNELS", "PRESETS", "run"]

KERNELS = {"gaussian": lambda rule: Gaussian(rule),
           "rational_quadratic": lambda rule: RationalQuadratic(rule, 1.0)}


@dataclass(frozen=True)
class Config:
    """Sizes of one bandwidth run.

    Attributes
    ----------
    model : str
        ``"gaussian"`` or ``"hypersphere"``.
    d : int
    sizes : tuple of int
        Sample sizes ``N``.
    log_bandwidths : tuple of float
    seeds : int
    eps, lam : float
    """

    model: str
    d: int
    sizes: tuple[int, ...]
    log_bandwidths: tuple[float, ...]
    seeds: int
    eps: float = 1e-6
    lam: float = 0.0


PRESETS = {
    "full": Config("gaussian", 5, (300, 1000, 3000), tuple(np.linspace(-3, 5, 9)), seeds=5),
    "quick": Config("gaussian", 5, (100, 300, 1000), tuple(np.linspace(-3, 3, 7)), seeds=3),
    "tiny": Config("gaussian", 2, (200,), (-2.0, 0.0, 2.0), seeds=2),
}


def run(*, size: str = "full", backend: str = "numpy", device: str | None = None, seed: int = 0,
        out=None, show_progress: bool = True, verbose: bool = True) -> _io.Result:
    """Run the bandwidth sweep; write ``bandwidth.csv`` and ``bandwidth.png`` into ``out``.

    Parameters
    ----------
    size : {"full", "quick", "tiny"}
    backend : {"numpy", "torch", "cupy"}
    device : str, optional
    seed : int
        Base seed; repetition ``r`` uses ``seed + r`` (the same draws for every bandwidth and
        kernel, so the curves differ only through the kernel).
    out : path-like
    show_progress, verbose : bool

    Returns
    -------
    Result
        Rows with ``model, d, N, M, eps, lam, kernel, log_bandwidth, seed, rel_error, seconds``.
    """
    cfg = _io.check_size(size, PRESETS)
    arrays = _io.Arrays(backend, device)
    path = _io.out_dir(out)
    model = MODELS[cfg.model](cfg.d)
    jobs = [(k, lb, n, seed + r) for k in KERNELS for lb in cfg.log_bandwidths for n in cfg.sizes
            for r in range(cfg.seeds)]
    rows = []
    for kname, lb, n, s in _io.progress(jobs, desc="bandwidth", enabled=show_progress):
        m = basis_size(cfg.d, n)
        rng = np.random.default_rng([s, cfg.d, n, m])  # independent of the kernel and bandwidth
        start = time.perf_counter()
        err = relative_error(model, n, m, rng, arrays, kernel=KERNELS[kname](AuthorsRule(float(lb))),
                             eps=cfg.eps, lam=cfg.lam)
        rows.append({"model": cfg.model, "d": cfg.d, "N": n, "M": m, "eps": cfg.eps, "lam": cfg.lam,
                     "kernel": kname, "log_bandwidth": float(lb), "seed": s, "backend": backend,
                     "rel_error": err, "seconds": time.perf_counter() - start})
    files = [_io.write_csv(path / "bandwidth.csv", rows)]
    summary = _best(rows)
    table = _io.summarise(rows, ("kernel", "N", "log_bandwidth"), "rel_error")
    text = "\n\n".join([
        _io.format_table(summary, title=f"bandwidth: best log-bandwidth per kernel and N "
                                        f"({cfg.model}, d = {cfg.d})"),
        _io.format_table([r for r in table if r["N"] == max(cfg.sizes)],
                         title=f"bandwidth: median relative error at N = {max(cfg.sizes)}"),
    ])
    files.append(plot(rows, path, cfg))
    if verbose:
        print(text)
    return _io.Result("bandwidth", rows, summary, files, text)


def _best(rows):
    """Per (kernel, N): the log-bandwidth of smallest median error, and the range within 2× of it."""
    out = []
    table = _io.summarise(rows, ("kernel", "N", "log_bandwidth"), "rel_error")
    for (kname, n), members in _io.group(table, ("kernel", "N")).items():
        best = min(members, key=lambda r: r["median"])
        good = [r["log_bandwidth"] for r in members if r["median"] <= 2 * best["median"]]
        out.append({"kernel": kname, "N": n, "best_log_bw": best["log_bandwidth"], "median": best["median"],
                    "within_2x_from": min(good), "within_2x_to": max(good),
                    "at_log_bw_0": next(r["median"] for r in members if r["log_bandwidth"] == 0.0)
                    if any(r["log_bandwidth"] == 0.0 for r in members) else float("nan")})
    return out


def plot(rows, path, cfg: Config):
    """``bandwidth.png``: one panel per kernel, a median line with IQR band per ``N``."""
    plt = _io.pyplot()
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    fig, axes = plt.subplots(1, len(kernels), figsize=(4.8 * len(kernels), 3.6), squeeze=False, sharey=True)
    for ax, kname in zip(axes[0], kernels, strict=True):
        for (n,), members in _io.group([r for r in rows if r["kernel"] == kname], ("N",)).items():
            groups = _io.group(members, ("log_bandwidth",))
            by_lb = {k[0]: [r["rel_error"] for r in v] for k, v in groups.items()}
            _io.band(ax, sorted(by_lb), by_lb, label=f"N = {n}")
        ax.set(yscale="log", xlabel="log10 bandwidth factor (AuthorsRule)", title=kname.replace("_", "-"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"relative error ({cfg.model}, d = {cfg.d})")
    return _io.save_figure(fig, path / "bandwidth.png")

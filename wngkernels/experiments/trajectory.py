r"""Optimisation trajectories: ``W₂²`` minimisation in a badly scaled parametrisation.

The model is a diagonal Gaussian ``X = μ + σ ⊙ Z`` (:class:`~wngkernels.models.DiagonalGaussianModel`),
``θ = (μ, σ) ∈ R^{2d}``, for which ``G_W(θ) = I``. It is re-parametrised as ``θ = s ⊙ ψ`` with a
fixed positive scaling ``s`` whose condition number ``max s / min s`` is ``cond`` (entries
log-spaced, in a fixed shuffled order), so in ``ψ``

.. math:: G_W(\psi) = S\,G_W(\theta)\,S = \mathrm{diag}(s^2), \qquad
          \nabla_\psi \mathcal L = s \odot \nabla_\theta \mathcal L ,

and the loss :math:`\mathcal L(\psi) = W_2^2(\rho_{\theta(\psi)}, \rho_{\theta^*}) =
\lVert s\odot\psi - \theta^*\rVert^2` has a Hessian of condition number ``cond²``.

Methods, all from the same start ``θ₀ = (0, 1)``:

- ``gd``: ``ψ ← ψ − (lr / max s²) ∇_ψ L`` (the step that contracts the best-scaled direction as
  fast as the natural gradient does);
- ``ng_exact``: ``ψ ← ψ − lr G_W(ψ)⁻¹ ∇_ψ L`` (closed form);
- ``kwng``, ``kwng_diag``: the same with :func:`wngkernels.kwng_direction` from ``N`` fresh samples
  per step (Jacobian in ``ψ``: ``J_θ S``), ``D = I`` and ``D = diag(Ĝ)^{-1/2}``;
- ``kwng_theta``: KWNG in the well-scaled ``θ`` itself (``D = I``), with the same samples and
  basis as ``kwng`` — the invariance check: its path in ``θ`` should match ``kwng``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import AuthorsRule, Gaussian, kwng_direction, nystrom_basis
from ..models import DiagonalGaussianModel, w2_diagonal_gaussians, w2_diagonal_gaussians_grad
from . import _io
from .consistency import basis_size

__all__ = ["Config", "METHODS", "PRESETS", "run", "scaling"]

METHODS = ("gd", "ng_exact", "kwng", "kwng_diag", "kwng_theta")


@dataclass(frozen=True)
class Config:
    """Sizes of one trajectory run.

    Attributes
    ----------
    d : int
        Dimension of ``X`` (``2d`` parameters).
    n : int
        Samples per KWNG step (``M = ⌊d √N⌋``).
    steps : int
        Iterations.
    seeds : int
        Repetitions of the stochastic methods.
    cond : float
        Condition number of the scaling ``s``.
    lr : float
        Natural-gradient step size.
    eps : float
        KWNG damping (below ``min s²`` so that the slow directions are not damped away).
    """

    d: int
    n: int
    steps: int
    seeds: int
    cond: float = 1e3
    lr: float = 0.05
    eps: float = 1e-9


PRESETS = {
    "full": Config(d=3, n=500, steps=100, seeds=3),
    "quick": Config(d=2, n=400, steps=80, seeds=3),
    "tiny": Config(d=2, n=200, steps=25, seeds=1, lr=0.15),
}


def scaling(q: int, cond: float) -> np.ndarray:
    """The fixed scaling ``s`` ``(q,)``: log-spaced from 1 to ``1/cond``, shuffled by a fixed seed."""
    if not cond >= 1:
        raise ValueError(f"cond must be >= 1; got {cond!r}")
    s = np.logspace(0.0, -math.log10(cond), q)
    return s[np.random.default_rng(12345).permutation(q)]


def _problem(cfg: Config):
    rng = np.random.default_rng(2024)  # the target is part of the problem, not of the seed
    d = cfg.d
    target = np.concatenate([rng.standard_normal(d), np.exp(0.3 * rng.standard_normal(d))])
    start = np.concatenate([np.zeros(d), np.ones(d)])
    return start, target, scaling(2 * d, cfg.cond)


def _trajectory(method: str, seed: int, cfg: Config, arrays: _io.Arrays, kernel):
    model = DiagonalGaussianModel(cfg.d)
    start, target, s = _problem(cfg)
    q = model.num_params
    fast, slow = int(np.argmax(s)), int(np.argmin(s))
    s_np, s, target = s, arrays.asarray(s), arrays.asarray(target)
    psi = arrays.asarray(start / s_np)
    rng = np.random.default_rng([seed, cfg.n, cfg.d])
    m = basis_size(cfg.d, cfg.n)
    lr = cfg.lr / float(np.max(s_np) ** 2) if method == "gd" else cfg.lr
    rows = []
    for it in range(cfg.steps + 1):
        theta = s * psi
        loss = float(w2_diagonal_gaussians(theta, target))
        rows.append({"method": method, "seed": seed, "iter": it, "loss": loss,
                     "theta_fast": float(theta[fast]), "theta_slow": float(theta[slow])})
        if it == cfg.steps or not math.isfinite(loss):
            break
        g_theta = w2_diagonal_gaussians_grad(theta, target)
        g_psi = s * g_theta
        if method == "gd":
            step = g_psi
        elif method == "ng_exact":
            step = model.natural_gradient(theta, g_theta) / s  # S⁻¹ G_θ⁻¹ S⁻¹ g_ψ
        else:
            z = model.sample_latent(cfg.n, rng=rng, like=arrays.like)
            basis = nystrom_basis((cfg.n, cfg.d), m, rng=rng)
            x, jac = model.h(theta, z), model.jacobian(theta, z)
            if method == "kwng_theta":  # in θ, mapped back to a ψ step: Δψ = Δθ / s
                step = kwng_direction(g_theta, x, kernel=kernel, basis=basis, eps=cfg.eps, jacobian=jac) / s
            else:
                step = kwng_direction(g_psi, x, kernel=kernel, basis=basis, eps=cfg.eps,
                                      jacobian=jac * s[None, None, :],
                                      damping="jacobian" if method == "kwng_diag" else "identity")
        psi = psi - lr * step
    return rows, q


def run(*, size: str = "full", backend: str = "numpy", device: str | None = None, seed: int = 0,
        out=None, show_progress: bool = True, verbose: bool = True, methods=METHODS) -> _io.Result:
    """Run the trajectory experiment; write ``trajectory.csv`` and ``trajectory.png`` into ``out``.

    Parameters
    ----------
    size : {"full", "quick", "tiny"}
    backend : {"numpy", "torch", "cupy"}
    device : str, optional
    seed : int
        Base seed of the stochastic (KWNG) methods; repetition ``r`` uses ``seed + r``.
    out : path-like
    show_progress, verbose : bool
    methods : sequence of str
        Subset of :data:`METHODS`.

    Returns
    -------
    Result
        One row per (method, seed, iteration): ``method, seed, iter, loss, theta_fast,
        theta_slow, d, N, M, eps, cond, lr``.
    """
    cfg = _io.check_size(size, PRESETS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {', '.join(METHODS)}; got {list(methods)}")
    arrays = _io.Arrays(backend, device)
    path = _io.out_dir(out)
    kernel = Gaussian(AuthorsRule(0.0))
    jobs = [(m, seed + r) for m in methods for r in range(cfg.seeds if m.startswith("kwng") else 1)]
    rows = []
    extra = {"d": cfg.d, "N": cfg.n, "M": basis_size(cfg.d, cfg.n), "eps": cfg.eps, "cond": cfg.cond,
             "lr": cfg.lr, "backend": backend}
    for method, s in _io.progress(jobs, desc="trajectory", enabled=show_progress):
        traj, _ = _trajectory(method, s, cfg, arrays, kernel)
        rows += [{**r, **extra} for r in traj]
    files = [_io.write_csv(path / "trajectory.csv", rows)]
    summary = _summary(rows, cfg)
    text = _io.format_table(summary, title=f"trajectory: W2^2 loss (d = {cfg.d}, cond(s) = {cfg.cond:g}, "
                                           f"{cfg.steps} steps)")
    files.append(plot(rows, path, cfg))
    if verbose:
        print(text)
    return _io.Result("trajectory", rows, summary, files, text)


def _summary(rows, cfg: Config):
    out = []
    for (method,), members in _io.group(rows, ("method",)).items():
        first = [r["loss"] for r in members if r["iter"] == 0]
        last_iter = {}
        for r in members:
            last_iter[r["seed"]] = r
        finals = [r["loss"] for r in last_iter.values()]
        q1, med, q3 = _io.quantiles(finals)
        half = [r["loss"] for r in members if r["iter"] == cfg.steps // 2]
        out.append({"method": method, "runs": len(finals), "initial": _io.quantiles(first)[1],
                    f"loss@{cfg.steps // 2}": _io.quantiles(half)[1], f"loss@{cfg.steps}": med,
                    "q25": q1, "q75": q3})
    return out


#: method → (colour, line style, marker, legend label); the KWNG paths coincide, so markers tell them apart
LINE_STYLES = {
    "gd": ("tab:red", "-", None, "gd: gradient descent in ψ"),
    "ng_exact": ("k", "--", None, "ng_exact: exact W natural gradient"),
    "kwng": ("tab:blue", "-", "o", "kwng: KWNG in ψ, D = I"),
    "kwng_diag": ("tab:green", "--", "s", "kwng_diag: KWNG in ψ, D = diag(Ĝ)^-1/2"),
    "kwng_theta": ("tab:purple", ":", "^", "kwng_theta: KWNG in θ, mapped to ψ"),
}


def plot(rows, path, cfg: Config):
    """``trajectory.png``: loss versus iteration, and the path in ``(θ_fast, θ_slow)``."""
    plt = _io.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    _, target, s = _problem(cfg)
    seeds = len({r["seed"] for r in rows})
    for offset, ((method,), members) in enumerate(_io.group(rows, ("method",)).items()):
        color, ls, marker, label = LINE_STYLES.get(method, (None, "-", None, method))
        by_it = {k[0]: [r["loss"] for r in v] for k, v in _io.group(members, ("iter",)).items()}
        its = sorted(by_it)
        every = (offset % 3 * max(len(its) // 30, 1), max(len(its) // 10, 1))  # staggered markers
        _io.band(ax1, its, by_it, label=label, color=color, ls=ls, marker=marker, ms=4, markevery=every,
                 mfc="none")
        first_seed = members[0]["seed"]
        path_rows = [r for r in members if r["seed"] == first_seed]
        ax2.plot([r["theta_fast"] for r in path_rows], [r["theta_slow"] for r in path_rows], color=color,
                 ls=ls, lw=1.2, marker=marker or ".", ms=4 if marker else 2, markevery=every if marker else 1,
                 mfc="none", label=label)
    ax1.set(yscale="log", xlabel="iteration", ylabel=r"$W_2^2(\rho_\theta, \rho_{\theta^*})$",
            title=f"loss: median, band = IQR over {seeds} seeds; cond(s) = {cfg.cond:g}")
    ax1.title.set_fontsize(9)
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fast, slow = int(np.argmax(s)), int(np.argmin(s))
    ax2.plot([target[fast]], [target[slow]], "k*", ms=12, label="target")
    ax2.set(xlabel=f"θ[{fast}] (scale s = {s[fast]:.3g})", ylabel=f"θ[{slow}] (scale s = {s[slow]:.3g})",
            title="path in θ (first seed): best- vs worst-scaled coordinate")
    ax2.title.set_fontsize(9)
    ax2.legend(handles=ax2.get_lines()[-1:], fontsize=7, loc="lower right")  # the target; lines as left
    ax2.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    return _io.save_figure(fig, path / "trajectory.png")

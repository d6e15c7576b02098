"""Accuracy of the KWNG estimator against the closed forms (docs/accuracy.md).

For the seed's Gaussians and hyperspheres, d ∈ {2, 5, 10}, N ∈ {300, 1000, 3000},
M = ⌊d√N⌋, ε ∈ {1e-3, 1e-5, 1e-8}, damping D = I and D = diag(Ĝ)^{-1/2}: the median (over
seeds) relative error ‖w − G_W⁻¹g‖ / ‖G_W⁻¹g‖, float64 NumPy, Gaussian kernel with the authors'
bandwidth rule, λ = 0. ``C Cᵀ`` and ``T`` are computed once per (model, d, N, seed) with the
public building blocks, then solved for every (ε, damping) — the same arithmetic as
``kwng_direction``. A column compares the Woodbury formula as written (the mathematics page, D = I).

Usage::

    python benchmarks/accuracy_table.py [--seeds 10] [--out docs/accuracy_table.md]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import wngkernels as wk
from wngkernels.models import GaussianModel, HypersphereModel

EPS = (1e-3, 1e-5, 1e-8)
DAMPING = ("identity", "jacobian")


def naive_woodbury(t_white, g, eps):
    m = t_white.shape[0]
    inner = np.linalg.solve(t_white @ t_white.T + eps * np.eye(m), t_white @ g)
    return (g - t_white.T @ inner) / eps


def errors(model, n, seed):
    """Relative errors for every (eps, damping), plus the naive Woodbury form, at one seed."""
    theta, z = model.default_theta(), model.sample_latent(n, rng=seed)
    x, jac = model.h(theta, z), model.jacobian(theta, z)
    g = np.random.default_rng(10_000 + seed).normal(size=model.num_params)
    exact = model.natural_gradient(theta, g)
    m = int(model.d * np.sqrt(n))
    basis = wk.nystrom_basis(x, m, rng=seed)
    kernel = wk.Gaussian(wk.AuthorsRule()).resolve(x[basis.indices], x)
    cc = wk.cc_gram(x, kernel=kernel, basis=basis)
    t_white = wk.whiten(cc, wk.t_matrix(x, kernel=kernel, basis=basis, jacobian=jac))
    out = {}
    for damping in DAMPING:
        dmp = None if damping == "identity" else wk.damping_from_whitened(t_white)
        for eps in EPS:
            w = wk.solve_whitened(t_white, g, eps=eps, damping=dmp)
            out[(damping, eps)] = np.linalg.norm(w - exact) / np.linalg.norm(exact)
    for eps in EPS:
        w = naive_woodbury(t_white, g, eps)
        out[("woodbury", eps)] = np.linalg.norm(w - exact) / np.linalg.norm(exact)
    return m, out


def rounding_table(seed: int = 0) -> str:
    """Rounding error of each solve form against an exact-to-rounding SVD solution.

    Two whitened systems: the seed's Gaussian model (d = 5, N = 3000, M = 273, q = 6: the
    primal regime) and a random linear model with q = 2000 > M = 200 (the dual regime).
    """
    rng = np.random.default_rng(seed)
    model = GaussianModel(5)
    theta, z = model.default_theta(), model.sample_latent(3000, rng=seed)
    x, jac = model.h(theta, z), model.jacobian(theta, z)
    basis = wk.nystrom_basis(x, 273, rng=seed)
    kernel = wk.Gaussian(wk.AuthorsRule()).resolve(x[basis.indices], x)
    primal_case = wk.whiten(wk.cc_gram(x, kernel=kernel, basis=basis),
                            wk.t_matrix(x, kernel=kernel, basis=basis, jacobian=jac))
    xl, jl = rng.normal(size=(500, 4)), rng.normal(size=(500, 4, 2000)) / 30
    bl = wk.nystrom_basis(xl, 200, rng=seed)
    kl = wk.Gaussian(wk.AuthorsRule()).resolve(xl[bl.indices], xl)
    dual_case = wk.whiten(wk.cc_gram(xl, kernel=kl, basis=bl),
                          wk.t_matrix(xl, kernel=kl, basis=bl, jacobian=jl))
    lines = ["| system | ε | primal (eigh of SᵀS) | dual (Gram passes) | dual-qr (Householder) "
             "| Woodbury as written | auto picks |", "|---|---|---|---|---|---|---|"]
    for name, t_white in (("Gaussian d=5, q=6 ≤ M=273", primal_case), ("linear, q=2000 > M=200", dual_case)):
        m, q = t_white.shape
        g = rng.normal(size=q)
        _, sig, wt = np.linalg.svd(t_white, full_matrices=True)
        sig2 = np.concatenate([sig**2, np.zeros(q - sig.size)])
        for eps in (1e-3, 1e-5, 1e-8, 1e-10):
            exact = wt.T @ ((wt @ g) / (sig2 + eps))
            solves = [wk.solve_whitened(t_white, g, eps=eps, form=f) for f in ("primal", "dual", "dual-qr")]
            solves.append(naive_woodbury(t_white, g, eps))
            cells = [np.linalg.norm(w - exact) / np.linalg.norm(exact) for w in solves]
            lines.append(f"| {name} | {eps:.0e} | " + " | ".join(f"{c:.1e}" for c in cells)
                         + f" | {'primal' if q <= m else 'dual'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    args = parser.parse_args(argv)
    cols = [(dmp, eps) for dmp in DAMPING for eps in EPS] + [("woodbury", eps) for eps in EPS]
    head = "| model | d | N | M | " + " | ".join(
        f"{'D=I' if c[0] == 'identity' else 'D=diag' if c[0] == 'jacobian' else 'Woodbury D=I'} "
        f"ε={c[1]:.0e}" for c in cols) + " |"
    lines = [head, "|" + "---|" * (4 + len(cols))]
    start = time.perf_counter()
    for model_cls in (GaussianModel, HypersphereModel):
        for d in (2, 5, 10):
            model = model_cls(d)
            for n in (300, 1000, 3000):
                runs = [errors(model, n, s) for s in range(args.seeds)]
                m = runs[0][0]
                med = [np.median([r[1][c] for r in runs]) for c in cols]
                lines.append(f"| {model_cls.__name__} | {d} | {n} | {m} | "
                             + " | ".join(f"{v:.2%}" if v < 10 else f"{v:.1e}" for v in med) + " |")
                print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n\nRounding error of the solve forms:\n\n" + rounding_table()
    print(f"\n{table}\n\n({args.seeds} seeds, {time.perf_counter() - start:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()

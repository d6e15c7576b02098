r"""Ill-conditioned classification: SGD, Adam and KWNG on scikit-learn's digits.

The seed's construction: the logits ``h_θ(Z)`` of a network are multiplied, class
by class, by ``U = logspace(-6, 1, C)``, so the loss ``ℓ(U h_θ(Z), Y)`` sees directions whose
curvature differs by up to fourteen orders of magnitude. The Wasserstein geometry of the
*scaled* outputs ``X = U h_θ(Z)`` compensates the scaling, the Euclidean one does not; so the
outputs handed to :class:`wngkernels.torch.KWNG` are the scaled logits. ``well_conditioned=True``
drops ``U`` (the paper's contrast).

Data: ``sklearn.datasets.load_digits`` (1797 8×8 images, 10 classes, bundled with scikit-learn:
no download), standardised, a fixed 75/25 split. Model: an MLP ``64 → hidden → hidden → 10``
with ReLU. Optimisers, each from the same initialisation per seed and the same mini-batches:

- ``sgd``: SGD with momentum 0.9;
- ``adam``: Adam;
- ``kwng_identity``, ``kwng_diag``: KWNG (``M = 5``, adaptive ``ε``, direction clipped to norm
  1) with ``D = I`` and ``D = diag(Ĝ)^{-1/2}``, then plain SGD (no momentum), as in the
  authors' configuration.

Learning rates (and SGD's momentum) were chosen by a small sweep (300 steps, two seeds, final
training loss on the ill-conditioned problem; see ``docs/experiments.md``) and are kept for the
well-conditioned one.
On the CPU, training runs single-threaded (faster for a network this small).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from . import _io

__all__ = ["Config", "OPTIMIZERS", "PRESETS", "load_data", "run"]

OPTIMIZERS = ("sgd", "adam", "kwng_identity", "kwng_diag")


@dataclass(frozen=True)
class Config:
    """Sizes of one classification run.

    Attributes
    ----------
    steps : int
        Optimisation steps (mini-batches).
    seeds : int
        Repetitions (initialisation and batch order).
    batch_size, hidden : int
    eval_every : int
        Steps between evaluations of the full training loss and the test accuracy.
    lrs : dict
        Learning rate per optimiser.
    momentum : dict
        SGD's momentum per optimiser (Adam ignores it).
    num_basis : int
        KWNG's ``M``.
    """

    steps: int
    seeds: int
    batch_size: int = 128
    hidden: int = 64
    eval_every: int = 10
    num_basis: int = 5
    lrs: dict = field(default_factory=lambda: {"sgd": 0.1, "adam": 1e-2, "kwng_identity": 1.0,
                                               "kwng_diag": 10.0})
    momentum: dict = field(default_factory=lambda: {"sgd": 0.9, "kwng_identity": 0.0, "kwng_diag": 0.0})


PRESETS = {
    "full": Config(steps=1500, seeds=3, eval_every=25),
    "quick": Config(steps=300, seeds=2, eval_every=20),
    "tiny": Config(steps=60, seeds=1, eval_every=20, hidden=32),
}


def load_data(seed_split: int = 0):
    """Standardised digits: ``(x_train, y_train, x_test, y_test)`` as NumPy arrays (75/25 split)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed_split, stratify=y)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0) + 1e-6
    return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def _make_optimizer(name: str, model, lr: float, cfg: Config, seed: int):
    import torch

    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr), None
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum[name])
    if name == "sgd":
        return opt, None
    from ..torch import KWNG

    damping = "identity" if name == "kwng_identity" else "jacobian"
    kwng = KWNG(model.parameters(), num_basis=cfg.num_basis, damping=damping, eps=1e-5, adaptive_eps=True,
                clip_norm=1.0, generator=seed, optimizer=opt)
    return opt, kwng


def _train(name: str, seed: int, cfg: Config, data, scale, device):
    import torch

    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(x_tr.shape[1], cfg.hidden), torch.nn.ReLU(),
        torch.nn.Linear(cfg.hidden, cfg.hidden), torch.nn.ReLU(),
        torch.nn.Linear(cfg.hidden, scale.shape[0]),
    ).to(device=device, dtype=torch.float32)
    opt, kwng = _make_optimizer(name, model, cfg.lrs[name], cfg, seed)
    crit = torch.nn.functional.cross_entropy
    order = np.random.default_rng([seed, 7])
    n = x_tr.shape[0]
    batches = (n + cfg.batch_size - 1) // cfg.batch_size

    def evaluate():
        with torch.no_grad():
            train_loss = float(crit(model(x_tr) * scale, y_tr))
            acc = float((torch.argmax(model(x_te) * scale, dim=1) == y_te).float().mean())
        return train_loss, acc

    rows, wall, perm = [], 0.0, None
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            loss, acc = evaluate()
            rows.append({"optimizer": name, "seed": seed, "step": step, "wall_s": wall, "train_loss": loss,
                         "test_acc": acc, "eps": float("nan") if kwng is None else float(kwng.current_eps()),
                         "fallbacks": 0 if kwng is None else kwng.num_fallbacks})
            if not math.isfinite(loss) or step == cfg.steps:
                break
        if step % batches == 0:
            perm = torch.as_tensor(order.permutation(n), device=device)
        idx = perm[(step % batches) * cfg.batch_size:(step % batches + 1) * cfg.batch_size]
        start = time.perf_counter()
        opt.zero_grad()
        out = model(x_tr[idx]) * scale
        loss = crit(out, y_tr[idx])
        if kwng is None:
            loss.backward()
        else:
            kwng.precondition(out, loss)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall += time.perf_counter() - start
    return rows


def run(*, size: str = "full", backend: str = "numpy", device: str | None = None, seed: int = 0, out=None,
        show_progress: bool = True, verbose: bool = True, well_conditioned: bool = False,
        optimizers=OPTIMIZERS) -> _io.Result:
    """Run the classification experiment; write ``classification[_wellcond].csv`` and a PNG.

    Parameters
    ----------
    size : {"full", "quick", "tiny"}
    backend : {"numpy", "torch"}
        The network always runs on PyTorch; ``"numpy"`` (the CLI default) means torch on the
        CPU unless ``device`` says otherwise. CuPy is refused.
    device : str, optional
        Torch device, e.g. ``"cuda"``.
    seed : int
        Base seed; repetition ``r`` uses ``seed + r`` (initialisation, batch order, basis draws).
    out : path-like
    show_progress, verbose : bool
    well_conditioned : bool
        Drop the logit scaling ``U``.
    optimizers : sequence of str
        Subset of :data:`OPTIMIZERS`.

    Returns
    -------
    Result
        One row per (optimizer, seed, evaluation step): ``optimizer, seed, step, wall_s,
        train_loss, test_acc, eps, fallbacks, conditioning, lr, batch_size, hidden, device``.
    """
    cfg = _io.check_size(size, PRESETS)
    if backend not in ("numpy", "torch"):
        raise ValueError(f"backend for classification must be numpy or torch (it trains a torch "
                         f"network); got {backend!r}")
    unknown = [o for o in optimizers if o not in OPTIMIZERS]
    if unknown or not optimizers:
        raise ValueError(f"optimizers must be a non-empty subset of {', '.join(OPTIMIZERS)}; "
                         f"got {list(optimizers)}")
    torch_device = _io.Arrays("torch", device or "cpu").device
    import torch

    path = _io.out_dir(out)
    x_tr, y_tr, x_te, y_te = load_data()
    data = (torch.as_tensor(x_tr, dtype=torch.float32, device=torch_device),
            torch.as_tensor(y_tr, device=torch_device),
            torch.as_tensor(x_te, dtype=torch.float32, device=torch_device),
            torch.as_tensor(y_te, device=torch_device))
    classes = int(y_tr.max()) + 1
    scale = np.ones(classes) if well_conditioned else np.logspace(-6, 1, classes)
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=torch_device)
    conditioning = "well" if well_conditioned else "ill"
    jobs = [(o, seed + r) for o in optimizers for r in range(cfg.seeds)]
    rows = []
    threads = torch.get_num_threads()
    if torch_device.type == "cpu":  # a tiny MLP: one thread is faster than several contending ones
        torch.set_num_threads(1)
    try:
        for name, s in _io.progress(jobs, desc=f"classification ({conditioning})", enabled=show_progress):
            extra = {"conditioning": conditioning, "lr": cfg.lrs[name],
                     "momentum": cfg.momentum.get(name, 0.0),
                     "batch_size": cfg.batch_size, "hidden": cfg.hidden,
                     "device": str(torch_device)}
            rows += [{**r, **extra} for r in _train(name, s, cfg, data, scale_t, torch_device)]
    finally:
        torch.set_num_threads(threads)
    stem = "classification" + ("_wellcond" if well_conditioned else "")
    files = [_io.write_csv(path / f"{stem}.csv", rows)]
    summary = _summary(rows)
    text = _io.format_table(summary, title=f"classification ({conditioning}-conditioned digits, "
                                           f"{cfg.steps} steps, median over {cfg.seeds} seeds)")
    files.append(plot(rows, path / f"{stem}.png", conditioning))
    if verbose:
        print(text)
    return _io.Result("classification", rows, summary, files, text)


def _summary(rows):
    out = []
    for (name,), members in _io.group(rows, ("optimizer",)).items():
        last = {}
        for r in members:
            last[r["seed"]] = r
        finals = list(last.values())
        steps = max(r["step"] for r in finals)
        out.append({"optimizer": name, "steps": steps,
                    "train_loss": _io.quantiles(r["train_loss"] for r in finals)[1],
                    "test_acc": _io.quantiles(r["test_acc"] for r in finals)[1],
                    "best_test_acc": _io.quantiles(
                        max(m["test_acc"] for m in members if m["seed"] == r["seed"]) for r in finals)[1],
                    "wall_s": _io.quantiles(r["wall_s"] for r in finals)[1],
                    "ms_per_step": 1e3 * _io.quantiles(r["wall_s"] / max(r["step"], 1) for r in finals)[1],
                    "fallbacks": _io.quantiles(r["fallbacks"] for r in finals)[1]})
    return out


COLOURS = {"sgd": "tab:red", "adam": "tab:orange", "kwng_identity": "tab:blue", "kwng_diag": "tab:green"}


def plot(rows, file, conditioning: str):
    """Train loss and test accuracy against steps and against wall-clock seconds (2 × 2 panels)."""
    plt = _io.pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.8), sharey="row")
    seeds = len({r["seed"] for r in rows})
    for (name,), members in _io.group(rows, ("optimizer",)).items():
        color = COLOURS.get(name)
        for row, key in enumerate(("train_loss", "test_acc")):
            by_step = {k[0]: [r[key] for r in v] for k, v in _io.group(members, ("step",)).items()}
            _io.band(axes[row][0], sorted(by_step), by_step, label=name, color=color, marker=None)
            wall = {k[0]: [r["wall_s"] for r in v] for k, v in _io.group(members, ("step",)).items()}
            xs = sorted(by_step)
            axes[row][1].plot([_io.quantiles(wall[x])[1] for x in xs],
                              [_io.quantiles(by_step[x])[1] for x in xs], color=color, label=name)
    for col, xlabel in enumerate(("step", "training wall-clock (s)")):
        axes[0][col].set(yscale="log", xlabel=xlabel)
        axes[1][col].set(xlabel=xlabel)
        for row in range(2):
            axes[row][col].grid(True, which="both", alpha=0.3)
    low, high = axes[0][0].get_ylim()  # labels at 1, 2, 5 × 10^k, not only at the decades
    ticks = [m * 10.0**k for k in range(-12, 6) for m in (1, 2, 5) if low <= m * 10.0**k <= high]
    axes[0][0].yaxis.set_major_locator(FixedLocator(ticks))
    axes[0][0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axes[0][0].yaxis.set_minor_formatter(NullFormatter())
    axes[0][0].set_ylabel("train loss (full training set)")
    axes[1][0].set_ylabel("test accuracy")
    axes[0][0].set_title(f"against steps: median, band = IQR over {seeds} seeds", fontsize=9)
    axes[0][1].set_title("against training time: median", fontsize=9)
    handles, labels = axes[1][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"digits, {conditioning}-conditioned logits" + (" (× logspace(-6, 1, 10))"
                                                                 if conditioning == "ill" else ""))
    fig.subplots_adjust(bottom=0.12, hspace=0.3)
    return _io.save_figure(fig, file)

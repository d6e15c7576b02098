"""Training on the seed's ill-conditioned ResNet-18: SGD, Adam, the authors' KWNG and wngkernels' KWNG.

The paper's central experiment at the scale of one GPU: ResNet-18 (BatchNorm, CIFAR stem) with
logits × ``logspace(-6, 1, 10)`` on scikit-learn's digits upsampled to 3×32×32 (1347 train /
450 test), batch 128, 25 epochs. Every method starts from the same initialisation and sees the
same batches for a given seed:

- ``sgd_lr{0.1,1,10}``: SGD without momentum (a learning-rate sweep);
- ``momentum``: SGD with momentum 0.9, lr 0.1; ``adam_lr{1e-3,1e-2}``: Adam;
- ``authors``: the authors' 2019 recipe (``benchmarks/illcond.AuthorsRecipe``: M = 5, M backward
  passes, ``D = 1/(‖T̃_j‖ + 1e-8)``, ε from 1e-5 adapted every 5 steps, clipped to norm 1), then
  SGD with lr 10, as their configuration;
- ``kwng``: ``wngkernels.torch.KWNG`` with its defaults (the same algorithm), then SGD, lr 10;
- ``kwng_refresh10``: the same with ``refresh_every=10``;
- ``kwng_syncfree``, ``kwng_syncfree_refresh10``: the same with ``sync_free=True`` (Cholesky
  factors, nothing read back to the host);
- ``kwng_sub32``: ``T`` and ``C Cᵀ`` from a 32-sample sub-batch with its own forward (the split form:
  ``capture(model(x[:32]), loss)``, the full batch's ``loss.backward()``, ``step()``): ``T``'s backward
  runs over 32 samples instead of 128 (a cheaper Monte-Carlo estimate of the metric);
- ``kwng_bf16T``, ``kwng_sub32_bf16T``: ``T`` from its own forward under bfloat16 autocast (of the
  whole batch, or of 32 samples), so ``T``'s backward runs in bfloat16; ``g`` stays float32.

Reported per method (median over seeds): best and final test accuracy and the final training
loss (whole training set) as the authors' trainer measures them (BatchNorm normalises with the
statistics of each evaluation batch of ``--batch`` samples: their trainer evaluates in training
mode), best and final test accuracy with ``model.eval()`` (running statistics, ``*_eval``),
GPU-synchronised training time (evaluation excluded), the training time at which the test
accuracy first reaches SGD's best and Adam's best (each the best over its sweep, per seed), and
the non-finite parameters at the end. Writes ``illcond_train.csv`` (one row per method, seed and
epoch), ``illcond_train.md`` and ``illcond_train.png`` (test accuracy against training time) into ``--out``.

    python benchmarks/illcond_train.py --device cuda --seeds 3 --out results/illcond
    python benchmarks/illcond_train.py --quick --out /tmp/illcond        # CPU smoke run, ~20 s
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from illcond import AuthorsRecipe, ResNet18, digits_32, seeded, t_outputs  # noqa: E402

from wngkernels.torch import KWNG  # noqa: E402

#: name → (optimizer, lr, momentum, preconditioner, KWNG options)
METHODS = {
    "sgd_lr0.1": ("sgd", 0.1, 0.0, None, {}),
    "sgd_lr1": ("sgd", 1.0, 0.0, None, {}),
    "sgd_lr10": ("sgd", 10.0, 0.0, None, {}),
    "momentum": ("sgd", 0.1, 0.9, None, {}),
    "adam_lr1e-3": ("adam", 1e-3, 0.0, None, {}),
    "adam_lr1e-2": ("adam", 1e-2, 0.0, None, {}),
    "authors": ("sgd", 10.0, 0.0, "authors", {}),
    "kwng": ("sgd", 10.0, 0.0, "kwng", {}),
    "kwng_refresh10": ("sgd", 10.0, 0.0, "kwng", {"refresh_every": 10}),
    "kwng_syncfree": ("sgd", 10.0, 0.0, "kwng", {"sync_free": True}),
    "kwng_syncfree_refresh10": ("sgd", 10.0, 0.0, "kwng", {"sync_free": True, "refresh_every": 10}),
    "kwng_sub32": ("sgd", 10.0, 0.0, "kwng", {"t_batch": 32}),
    "kwng_bf16T": ("sgd", 10.0, 0.0, "kwng", {"t_autocast": torch.bfloat16}),
    "kwng_sub32_bf16T": ("sgd", 10.0, 0.0, "kwng", {"t_batch": 32, "t_autocast": torch.bfloat16}),
}
QUICK = ("sgd_lr1", "adam_lr1e-3", "authors", "kwng", "kwng_refresh10")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _norm_buffers(model):
    return [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for b in m.buffers()]


def _pass(model, x, y, batch):
    loss = correct = 0.0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch])
        loss += float(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + batch]).sum())
    return loss / len(x), correct / len(x)


def _evaluate(model, data, batch):
    """(train loss, test accuracy) twice: with the batch's BatchNorm statistics, in batches of
    ``batch`` (the authors' protocol: their trainer evaluates in training mode), and with the running
    statistics (``model.eval()``). The running statistics are left as they were."""
    x_tr, y_tr, x_te, y_te = data
    saved = [b.clone() for b in _norm_buffers(model)]
    with torch.no_grad():
        model.train()
        loss, _ = _pass(model, x_tr, y_tr, batch)
        _, acc = _pass(model, x_te, y_te, batch)
        for b, v in zip(_norm_buffers(model), saved, strict=True):
            b.copy_(v)
        model.eval()
        loss_eval, _ = _pass(model, x_tr, y_tr, 512)
        _, acc_eval = _pass(model, x_te, y_te, 512)
    model.train()
    return loss, acc, loss_eval, acc_eval


def train(name: str, seed: int, args, data, device):
    """One run: rows of (epoch, train time, training loss, test accuracy, ε, fallbacks)."""
    opt_name, lr, momentum, precond, options = METHODS[name]
    options = dict(options)
    t_batch = options.pop("t_batch", None)  # T from a sub-batch with its own forward (split form)
    t_cast = options.pop("t_autocast", None)  # ... or from its own forward under autocast
    torch.manual_seed(seed)
    model = ResNet18(width=args.width).to(device).train()
    params = list(model.parameters())
    if opt_name == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    kwng = authors = None
    if precond == "kwng":
        kwng = KWNG(params, num_basis=args.num_basis, optimizer=opt, **options)
    elif precond == "authors":
        authors = AuthorsRecipe(params, num_basis=args.num_basis)
    x_tr, y_tr = data[0], data[1]
    order = seeded(seed)
    rows, wall = [], 0.0

    def record(epoch):
        loss, acc, loss_eval, acc_eval = _evaluate(model, data, args.batch)
        eps, fallbacks = math.nan, 0
        if kwng is not None:
            eps, fallbacks = kwng.current_eps(), kwng.num_fallbacks
        elif authors is not None:
            eps, fallbacks = authors.eps, authors.fallbacks
        rows.append({"method": name, "seed": seed, "epoch": epoch, "train_s": wall, "train_loss": loss,
                     "test_acc": acc, "train_loss_eval": loss_eval, "test_acc_eval": acc_eval, "eps": eps,
                     "fallbacks": fallbacks})
        return math.isfinite(loss)

    record(0)
    for epoch in range(1, args.epochs + 1):
        perm = torch.as_tensor(order.permutation(len(x_tr)), device=device)
        _sync(device)
        start = time.perf_counter()
        for b in range(0, len(x_tr), args.batch):
            idx = perm[b:b + args.batch]
            opt.zero_grad()
            out_t = t_outputs(model, x_tr[idx], t_batch, t_cast) if t_batch or t_cast else None
            out = model(x_tr[idx])
            loss = F.cross_entropy(out, y_tr[idx])
            if out_t is not None:
                kwng.capture(out_t, loss)
                loss.backward()
                kwng.step()
            elif kwng is not None:
                kwng.precondition(out, loss)
            elif authors is not None:
                authors.step(out, loss, opt.param_groups[0]["lr"])
            else:
                loss.backward()
            opt.step()
        _sync(device)
        wall += time.perf_counter() - start
        if not record(epoch):
            break
    bad = sum(int((~torch.isfinite(p)).sum()) for p in params)
    for r in rows:
        r["nonfinite_params"] = bad
    return rows


def _median(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _time_to(members, target):
    """Training time at the first evaluation whose test accuracy reaches ``target`` (None if never)."""
    for r in sorted(members, key=lambda r: r["epoch"]):
        if r["test_acc"] >= target - 1e-12:
            return r["train_s"]
    return None


def _best_of(rows, prefix, seed):
    """The best test accuracy of a sweep (methods named ``prefix*``) on one seed, at its best lr."""
    names = sorted({r["method"] for r in rows if r["method"].startswith(prefix)})
    if not names:
        return None
    seeds = sorted({r["seed"] for r in rows})
    by_name = {n: _median([max(r["test_acc"] for r in rows if r["method"] == n and r["seed"] == s)
                           for s in seeds]) for n in names}
    best = max(names, key=lambda n: by_name[n])
    return max(r["test_acc"] for r in rows if r["method"] == best and r["seed"] == seed)


def summarise(rows):
    """One summary row per method (medians over seeds)."""
    out = []
    seeds = sorted({r["seed"] for r in rows})
    for name in dict.fromkeys(r["method"] for r in rows):
        per_seed = {s: [r for r in rows if r["method"] == name and r["seed"] == s] for s in seeds}
        per_seed = {s: m for s, m in per_seed.items() if m}
        last = {s: max(m, key=lambda r: r["epoch"]) for s, m in per_seed.items()}
        row = {
            "method": name,
            "best_test_acc": _median([max(r["test_acc"] for r in m) for m in per_seed.values()]),
            "final_test_acc": _median([r["test_acc"] for r in last.values()]),
            "final_train_loss": _median([r["train_loss"] for r in last.values()]),
            "best_test_acc_eval": _median([max(r["test_acc_eval"] for r in m) for m in per_seed.values()]),
            "final_test_acc_eval": _median([r["test_acc_eval"] for r in last.values()]),
            "train_s": _median([r["train_s"] for r in last.values()]),
            "nonfinite_params": max(r["nonfinite_params"] for r in last.values()),
            "fallbacks": _median([r["fallbacks"] for r in last.values()]),
        }
        for label, prefix in (("sgd", "sgd_lr"), ("adam", "adam_lr")):
            times = []
            for s, m in per_seed.items():
                target = _best_of(rows, prefix, s)
                times.append(None if target is None else _time_to(m, target))
            reached = [t for t in times if t is not None]
            row[f"s_to_{label}_best"] = _median(reached) if len(reached) * 2 > len(times) else math.nan
            row[f"reached_{label}_best"] = f"{len(reached)}/{len(times)}"
        out.append(row)
    return out


def table(summary, header: str) -> str:
    cols = ["method", "best_test_acc", "final_test_acc", "final_train_loss", "best_test_acc_eval",
            "final_test_acc_eval", "train_s", "s_to_sgd_best",
            "reached_sgd_best", "s_to_adam_best", "reached_adam_best", "fallbacks", "nonfinite_params"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:.3f}" if isinstance(v, float) and c != "train_s" and not c.startswith("s_to")
                         else f"{v:.1f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, file):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    styles = {"sgd": ("tab:red", "-"), "momentum": ("tab:purple", "-"), "adam": ("tab:orange", "-"),
              "authors": ("black", "--"), "kwng": ("tab:green", "-"), "kwng_refresh10": ("tab:blue", "-.")}
    seeds = sorted({r["seed"] for r in rows})
    for name in dict.fromkeys(r["method"] for r in rows):
        key = name if name in styles else name.split("_lr")[0]
        color, ls = styles.get(key, ("grey", ":"))
        epochs = sorted({r["epoch"] for r in rows if r["method"] == name})
        t, acc = [], []
        for e in epochs:
            at = [r for r in rows if r["method"] == name and r["epoch"] == e]
            if len(at) == len(seeds):
                t.append(_median([r["train_s"] for r in at]))
                acc.append(_median([r["test_acc"] for r in at]))
        alpha = 1.0 if key in ("authors", "kwng", "kwng_refresh10") else 0.7
        ax.plot(t, acc, color=color, ls=ls, marker="o", ms=2.5, lw=1.3, alpha=alpha, label=name)
    ax.set(xlabel="training time (s, GPU-synchronised; evaluation excluded)", ylabel="test accuracy",
           title=f"Ill-conditioned ResNet-18 on digits 32×32: median over {len(seeds)} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=default, choices=["cuda", "cpu"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="the first of the seeds run")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--num-basis", type=int, default=5)
    ap.add_argument("--width", type=int, default=64, help="ResNet-18's first-stage channels (64)")
    ap.add_argument("--size", type=int, default=32, help="image side after upsampling (32)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke run: width 4, 16×16 images, 2 epochs, 1 seed, " + ", ".join(QUICK))
    ap.add_argument("--out", default="results/illcond_train", help="folder for the CSV, table and figure")
    args = ap.parse_args(argv)
    if args.quick:
        args.device, args.width, args.size, args.epochs, args.seeds = "cpu", 4, 16, 2, 1
        args.methods = ",".join(QUICK)
    names = [m for m in args.methods.split(",") if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = digits_32(device, args.size)
    if device.type == "cuda":          # CUDA start-up and cuDNN's autotuning, outside every timed run
        warm = argparse.Namespace(**{**vars(args), "epochs": 1})
        for name in {METHODS[n][3]: n for n in reversed(names)}.values():
            train(name, 0, warm, data, device)
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name in names:
            run = train(name, seed, args, data, device)
            rows += run
            last = run[-1]
            print(f"seed {seed} {name:<16} best {max(r['test_acc'] for r in run):.3f} "
                  f"final {last['test_acc']:.3f} loss {last['train_loss']:.3f} {last['train_s']:.1f} s",
                  flush=True)
    with open(out / "illcond_train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (f"Ill-conditioned ResNet-18 (width {args.width}) on digits {args.size}×{args.size}, batch "
              f"{args.batch}, {args.epochs} epochs, M = {args.num_basis}, median over {args.seeds} seed(s); "
              f"{dev_name}, torch {torch.__version__}")
    text = table(summarise(rows), header)
    (out / "illcond_train.md").write_text(text + "\n")
    plot(rows, out / "illcond_train.png")
    print(text)


if __name__ == "__main__":
    main()

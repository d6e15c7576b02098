"""How far a cheaper ``T`` moves the KWNG direction: its cosine to the exact direction along training.

Trains the seed's ill-conditioned ResNet-18 with ``KWNG`` (its defaults, SGD lr 10: the ``kwng``
method of ``benchmarks/illcond_train.py``). Before the first epoch and after each epoch listed in
``--at``, on ``--batches`` training batches of 128, it computes the direction ``w`` written to
``.grad`` by the split form (``capture(outputs_T, loss)``, ``loss.backward()``, ``step()``) with
``ε`` fixed at the training run's current value and no clipping, for:

- ``exact``: ``T`` from the batch's own outputs (what ``precondition`` computes): the reference;
- ``exact, another basis``: the same with an independent Nyström basis — the estimator's own
  Monte-Carlo spread, against which the options below should be read;
- ``T from k samples``: ``T`` and ``C Cᵀ`` from a forward of the first ``k`` samples;
- ``T in bf16``: ``T`` from a forward of the whole batch under bfloat16 autocast, so ``T``'s
  backward runs in bfloat16 (``g`` stays float32);
- ``T from 32 samples in bf16``: both.

Every option shares the reference's basis (drawn among the first 32 samples), so the cosine measures
only what the option changes. BatchNorm's running statistics are restored after each measurement.
Reports the mean and smallest cosine per option and checkpoint, and the mean ratio ``‖w‖/‖w_exact‖``.

    python benchmarks/cheap_t.py --device cuda --at 2,5,10,25
    python benchmarks/cheap_t.py --quick        # CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from illcond import ResNet18, digits_32, seeded, t_outputs  # noqa: E402

from wngkernels import nystrom_basis  # noqa: E402
from wngkernels.torch import KWNG  # noqa: E402

#: name → (samples for T's forward (None: the batch's own outputs), autocast dtype or None, own basis)
OPTIONS = {
    "exact": (None, None, False),
    "exact, another basis": (None, None, True),
    "T from 64 samples": (64, None, False),
    "T from 32 samples": (32, None, False),
    "T in bf16": (0, torch.bfloat16, False),
    "T from 32 samples in bf16": (32, torch.bfloat16, False),
}


def direction(model, params, x, y, option, basis, eps: float, num_basis: int) -> torch.Tensor:
    """The direction one split-form step writes to ``.grad`` (flattened, float64)."""
    take, cast, _ = option
    kwng = KWNG(params, num_basis=num_basis, eps=eps, adaptive_eps=False, clip_norm=None)
    for p in params:
        p.grad = None
    out = model(x)
    loss = F.cross_entropy(out, y)
    out_t = out if take is None else t_outputs(model, x, take or None, cast)
    kwng.capture(out_t, loss, basis=basis)
    loss.backward()
    kwng.step()
    w = torch.cat([p.grad.reshape(-1) for p in params]).double()
    for p in params:
        p.grad = None
    return w


def measure(model, params, batches, eps: float, num_basis: int, rng) -> dict[str, list]:
    """Cosines to ``exact`` and norm ratios per option over ``batches``; BatchNorm buffers restored."""
    buffers = [b for b in model.buffers()]
    saved = [b.clone() for b in buffers]
    got = {name: ([], []) for name in OPTIONS if name != "exact"}
    for x, y in batches:
        d = model(x[:1]).shape[1]
        basis = nystrom_basis((min(32, len(x)), d), num_basis, rng=rng)
        other = nystrom_basis((len(x), d), num_basis, rng=rng)
        ref = direction(model, params, x, y, OPTIONS["exact"], basis, eps, num_basis)
        for name, option in OPTIONS.items():
            if name == "exact":
                continue
            w = direction(model, params, x, y, option, other if option[2] else basis, eps, num_basis)
            got[name][0].append(float(w @ ref / (w.norm() * ref.norm())))
            got[name][1].append(float(w.norm() / ref.norm()))
        for b, v in zip(buffers, saved, strict=True):
            b.copy_(v)
    return got


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=default, choices=["cuda", "cpu"])
    ap.add_argument("--at", default="2,5,10,25", help="epochs after which to measure (0 is always measured)")
    ap.add_argument("--batches", type=int, default=8, help="batches per checkpoint")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--num-basis", type=int, default=5)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke run: width 4, 16×16 images, 1 epoch, 2 batches")
    args = ap.parse_args(argv)
    if args.quick:
        args.device, args.width, args.size, args.at, args.batches = "cpu", 4, 16, "1", 2
    device = torch.device(args.device)
    at = sorted({int(a) for a in args.at.split(",") if a})
    x_tr, y_tr, _, _ = digits_32(device, args.size)
    torch.manual_seed(args.seed)
    model = ResNet18(width=args.width).to(device).train()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=10.0)
    kwng = KWNG(params, num_basis=args.num_basis, optimizer=opt)
    order, rng = seeded(args.seed), np.random.default_rng([args.seed, 7])
    probe = [(x_tr[i:i + args.batch], y_tr[i:i + args.batch])
             for i in order.permutation(len(x_tr) - args.batch)[:args.batches]]
    rows = []

    def record(epoch):
        got = measure(model, params, probe, kwng.current_eps(), args.num_basis, rng)
        eps = kwng.current_eps()
        for name, (cos, ratio) in got.items():
            rows.append((epoch, eps, name, statistics.mean(cos), min(cos), statistics.mean(ratio)))

    record(0)
    for epoch in range(1, max(at) + 1):
        perm = torch.as_tensor(order.permutation(len(x_tr)), device=device)
        for b in range(0, len(x_tr), args.batch):
            idx = perm[b:b + args.batch]
            opt.zero_grad()
            out = model(x_tr[idx])
            kwng.precondition(out, F.cross_entropy(out, y_tr[idx]))
            opt.step()
        if epoch in at:
            record(epoch)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"Cosine of each option's KWNG direction to the exact T's (same basis, same ε), ill-conditioned "
          f"ResNet-18 width {args.width}, batch {args.batch}, M = {args.num_basis}, {args.batches} batches "
          f"per checkpoint, seed {args.seed}; {dev}, torch {torch.__version__}")
    print("| epoch | ε | option | mean cosine | smallest cosine | mean ‖w‖/‖w_exact‖ |")
    print("|---|---|---|---|---|---|")
    for epoch, eps, name, mean, low, ratio in rows:
        print(f"| {epoch} | {eps:.2g} | {name} | {mean:.4f} | {low:.4f} | {ratio:.3f} |")
    return rows


if __name__ == "__main__":
    main()

"""The ``sync_free`` direction's float32 accuracy on the seed's ill-conditioned ResNet-18 (and the default's).

At each of ``--steps`` states of a real training run (KWNG's defaults, SGD with lr 10, the
authors' configuration), the direction for one batch and one basis is computed three times on
the same parameters: the default step in float64 (the reference), the default step in float32,
and ``sync_free=True`` in float32 (``adaptive_eps`` off and no clipping, so the three solve the
same system at the run's current ``ε``). Printed per state: ``ε``, ``‖w‖`` and each float32
direction's relative error ``‖w − w₆₄‖/‖w₆₄‖``, then the median and the largest error of each.
The batches are random images (the states are what matters: the network's conditioning).

    python benchmarks/sync_free_accuracy.py --width 16 --batch 32 --steps 12
    python benchmarks/sync_free_accuracy.py --quick        # a smoke run (width 4, 2 states)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from illcond import ResNet18  # noqa: E402

from wngkernels.nystrom import nystrom_basis  # noqa: E402
from wngkernels.torch import KWNG  # noqa: E402


def direction(model, dtype, sync_free, x, y, basis, eps):
    """The direction ``(q,)`` (float64) of a copy of ``model`` in ``dtype`` for one batch and basis."""
    m = copy.deepcopy(model).to(dtype)
    k = KWNG(m.parameters(), lr=10.0, sync_free=sync_free, adaptive_eps=False, clip_norm=None, eps=eps)
    out = m(x.to(dtype))
    k.precondition(out, F.cross_entropy(out, y), basis=basis)
    return torch.cat([p.grad.reshape(-1) for p in m.parameters()]).double()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.batch, args.steps = 4, 8, 2
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = ResNet18(width=args.width).train()
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    trainer = KWNG(model.parameters(), optimizer=opt, generator=args.seed)
    errors = {"default": [], "sync_free": []}
    print("| state | ε | ‖w‖ (float64) | default float32 | sync_free float32 |\n|---|---|---|---|---|")
    for step in range(args.steps):
        x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
        eps = trainer.current_eps()
        basis = nystrom_basis((args.batch, 10), 5, rng=rng)
        ref = direction(model, torch.float64, False, x, y, basis, eps)
        for name in errors:
            w = direction(model, torch.float32, name == "sync_free", x, y, basis, eps)
            errors[name].append(float((w - ref).norm() / ref.norm()))
        print(f"| {step} | {eps:.2e} | {float(ref.norm()):.2e} | {errors['default'][-1]:.1e} | "
              f"{errors['sync_free'][-1]:.1e} |", flush=True)
        opt.zero_grad()
        out = model(x)
        trainer.precondition(out, F.cross_entropy(out, y))
        opt.step()
    for name, e in errors.items():
        print(f"{name}: median {statistics.median(e):.1e}, largest {max(e):.1e}")
    return errors


if __name__ == "__main__":
    main()

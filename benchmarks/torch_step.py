"""Step time of KWNG on the seed's ill-conditioned ResNet-18 (a script, not an asv suite).

ResNet-18 (BasicBlock, [2, 2, 2, 2], CIFAR stem) on random CIFAR-shaped batches, logits scaled
by ``logspace(-6, 1, 10)``; one step = forward, backward (and KWNG), ``SGD.step``. Prints one
table: median ms/step and the ratio to plain SGD. Writes nothing unless ``--out``.

    python benchmarks/torch_step.py --device cuda
    python benchmarks/torch_step.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from wngkernels.torch import KWNG


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs; logits scaled by ``logspace(-6, 1, classes)`` (the seed's construction)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)
        self.register_buffer("scale", torch.logspace(-6, 1, classes))

    def forward(self, x):
        z = F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)
        return self.fc(z) * self.scale


def train_step(model, opt, kwng, x, y) -> None:
    """One step: forward, cross-entropy, backward (or ``kwng.precondition``), ``opt.step()``."""
    out = model(x)
    loss = F.cross_entropy(out, y)
    opt.zero_grad()
    if kwng is None:
        loss.backward()
    else:
        kwng.precondition(out, loss)
    opt.step()


def _time(make, device, steps: int, warmup: int, batch: int) -> float:
    torch.manual_seed(0)
    model = ResNet18().to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kwng = make(model, opt)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(model, opt, kwng, x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _methods(quick: bool):
    sizes = (5,) if quick else (5, 20, 64)
    loops = (5,) if quick else (5, 64)
    out = [("SGD", lambda m, o: None)]
    for k in sizes:
        out.append((f"KWNG M={k}", lambda m, o, k=k: KWNG(m.parameters(), num_basis=k, optimizer=o,
                                                          vjp_mode="batched", generator=0)))
    for k in loops:
        out.append((f"M-loop M={k}", lambda m, o, k=k: KWNG(m.parameters(), num_basis=k, optimizer=o,
                                                            vjp_mode="loop", generator=0)))
    out.append(("KWNG M=5 refresh_every=10", lambda m, o: KWNG(m.parameters(), num_basis=5, optimizer=o,
                                                               refresh_every=10, generator=0)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=default, choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=50, help="timed steps per method (median reported)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, batch 16, M=5 only")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch = 3, 1, 16
    device = torch.device(args.device)
    rows = [(name, _time(make, device, args.steps, args.warmup, args.batch))
            for name, make in _methods(args.quick)]
    base = rows[0][1]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"ResNet-18 (ill-conditioned logits), batch {args.batch}, {args.steps} steps, {name}, "
          f"torch {torch.__version__}")
    print(f"{'method':<28}{'ms/step':>10}{'× SGD':>8}")
    for label, ms in rows:
        print(f"{label:<28}{ms:>10.2f}{ms / base:>8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "batch": args.batch, "steps": args.steps,
                       "ms_per_step": dict(rows)}, f, indent=1)


if __name__ == "__main__":
    main()

"""Where one step's time goes: host and GPU time at each phase boundary, and the step's syncs.

Each repetition starts with the GPU idle (synchronised), then takes one step of
``benchmarks/torch_step.py`` (same models and methods) and marks each phase boundary twice: when
the host has finished launching up to it (``time.perf_counter``) and when the GPU has finished
executing up to it (a CUDA event), both in ms from the step's start; medians over ``--reps``. A
boundary whose GPU time is well after its host time had work queued (the GPU was the bottleneck);
equal times mean the host waited for the GPU there (a read), or the GPU for the host. For KWNG
the preconditioner's ``step()`` is marked too (``before step()``): what comes before it is the
capture (basis draw, kernel rows, the batched backward), what comes after is the refresh's linear
algebra, the safety checks and the write.

With ``--syncs`` (CUDA only): every synchronising operation of one step
(``torch.cuda.set_sync_debug_mode``), with the wngkernels frames that called it.

    python benchmarks/step_timeline.py --device cuda --methods sgd,authors5,kwng5,refresh10 --syncs
    python benchmarks/step_timeline.py --quick          # CPU smoke run (host times only)
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_step import LABELS, _methods, make_step  # noqa: E402


class Marks:
    """Phase boundaries of one step: ``(name, host ms, CUDA event or None)``."""

    def __init__(self, cuda: bool):
        self.cuda, self.rows, self.t0 = cuda, [], 0.0

    def start(self) -> None:
        self.rows.clear()
        self.t0 = time.perf_counter()
        self("start")

    def __call__(self, name: str) -> None:
        ev = None
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
        self.rows.append((name, (time.perf_counter() - self.t0) * 1e3, ev))

    def read(self) -> list[tuple[str, float, float]]:
        """``(name, host ms, GPU ms)`` after a synchronise (GPU ms NaN on the CPU)."""
        e0 = self.rows[0][2]
        return [(n, h, e0.elapsed_time(ev) if ev is not None else float("nan")) for n, h, ev in self.rows[1:]]


def marked(step, marks: Marks):
    """``step`` with its KWNG's ``step()`` marked on entry (the step's capture is done by then)."""
    kwng = step.kwng
    if kwng is not None:
        real = kwng.step

        def wrapped():
            marks("before step()")
            return real()
        kwng.step = wrapped
    return lambda: step(marks)


def timeline(step, device, reps: int, warmup: int) -> list[tuple[str, float, float]]:
    """Median host and GPU ms at each boundary over ``reps`` steps, each from an idle GPU."""
    cuda = device.type == "cuda"
    marks = Marks(cuda)
    run = marked(step, marks)
    seen = collections.defaultdict(list)
    for i in range(warmup + reps):
        if cuda:
            torch.cuda.synchronize()
        marks.start()
        run()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            for k, (name, h, g) in enumerate(marks.read()):
                seen[(k, name)].append((h, g))
    return [(name, statistics.median(h for h, _ in v), statistics.median(g for _, g in v))
            for (_, name), v in sorted(seen.items())]


def sync_sites(step) -> collections.Counter:
    """The synchronising CUDA operations of one step, keyed by (message, calling wngkernels frames)."""
    sites = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in traceback.extract_stack()[:-1] if "wngkernels" in f.filename]
        frames = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in stack]
        sites[" <- ".join(reversed(frames[-4:])) or "(outside wngkernels)"] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sites


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=default, choices=["cuda", "cpu"])
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50", "vit", "lm"])
    ap.add_argument("--methods", default="sgd,authors5,kwng5,refresh10",
                    help="comma-separated subset of " + ", ".join(_methods(False)))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=64, help="resnet18's first-stage channels")
    ap.add_argument("--syncs", action="store_true", help="list the synchronising operations (CUDA)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: batch 8, width 8, 2 reps")
    args = ap.parse_args(argv)
    args.compile = False
    if args.quick:
        args.device, args.reps, args.warmup, args.batch, args.width = "cpu", 2, 1, 8, 8
    methods = _methods(args.quick)
    names = args.methods.split(",")
    unknown = [n for n in names if n not in methods]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(methods)}")
    if args.syncs and args.device != "cuda":
        ap.error("--syncs needs --device cuda")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model}, batch {args.batch}, one step from an idle GPU, medians over {args.reps} steps, "
          f"{dev}, torch {torch.__version__}")
    out = {}
    for n in names:
        step = make_step(*methods[n], args, device)
        rows = timeline(step, device, args.reps, args.warmup)
        out[n] = rows
        print(f"\n{LABELS[n]}\n| boundary | host done (ms) | GPU done (ms) |\n|---|---|---|")
        for name, h, g in rows:
            print(f"| {name} | {h:.2f} | {g:.2f} |")
        if args.syncs and step.kwng is not None:
            print("\nsynchronising operations of one step:")
            for where, k in sync_sites(lambda s=step: s()).items():
                print(f"- {k}× {where}")
    return out


if __name__ == "__main__":
    main()

"""Command line: ``python -m wngkernels.experiments NAME [options] --out DIR``."""

from __future__ import annotations

import argparse
import sys
import time

from . import EXPERIMENTS, run
from ._io import BACKENDS, Arrays, pyplot

DESCRIPTION = """\
Reproduce the experiments of the Kernelized Wasserstein Natural Gradient paper.

  consistency     relative error of KWNG against closed forms, versus N, d and M
  bandwidth       error versus the kernel bandwidth; Gaussian vs rational-quadratic kernel
  trajectory      W2 minimisation in a badly scaled parametrisation: exact NG, KWNG, GD
  classification  ill-conditioned digits classification: SGD, Adam, KWNG (D = I, D = diag)

Each writes a tidy CSV (one row per run) and PNG plots into --out and prints a summary.
"""


def parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and the tests)."""
    p = argparse.ArgumentParser(prog="python -m wngkernels.experiments", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=EXPERIMENTS, metavar="NAME", help=f"one of: {', '.join(EXPERIMENTS)}")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--quick", action="store_true", help="small sizes: each finishes in under 2 minutes")
    p.add_argument("--backend", choices=BACKENDS, default="numpy",
                   help="array library the estimator runs on (default: numpy)")
    p.add_argument("--device", default=None, metavar="DEV",
                   help="device for torch/cupy, e.g. cpu, cuda, cuda:1 (default: the library's)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="base random seed (default: 0)")
    p.add_argument("--well-conditioned", action="store_true",
                   help="classification only: drop the logit scaling (the contrast run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # "tiny" exists for the test suite; not part of the documented interface
    p.add_argument("--size", choices=("full", "quick", "tiny"), default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    """Parse ``argv``, run the experiment, print its summary; return the exit status."""
    p = parser()
    args = p.parse_args(argv)
    if args.well_conditioned and args.name != "classification":
        p.error("--well-conditioned applies to the classification experiment only")
    if args.device is not None and args.backend == "numpy" and args.name != "classification":
        p.error(f"--device {args.device} needs --backend torch or cupy (numpy runs on the CPU)")
    size = args.size or ("quick" if args.quick else "full")
    kwargs = dict(size=size, backend=args.backend, device=args.device, seed=args.seed, out=args.out,
                  show_progress=not args.no_progress)
    if args.name == "classification":
        kwargs["well_conditioned"] = args.well_conditioned
    try:  # refuse a missing plotting library or an unusable backend/device before any work
        pyplot()
        if args.name != "classification":
            Arrays(args.backend, args.device)
    except (ValueError, TypeError, ImportError) as exc:
        p.error(str(exc))
    start = time.perf_counter()
    result = run(args.name, **kwargs)
    backend = "torch" if args.name == "classification" else args.backend
    print(f"\n{args.name} ({size}, backend {backend}) done in {time.perf_counter() - start:.1f} s; "
          f"wrote {', '.join(str(f) for f in result.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

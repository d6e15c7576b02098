"""Command line: ``python -m wngkernels.experiments NAME [options] --out DIR``.

Every argument is checked before any work starts: a bad one exits with status 2 and one line
on stderr, as argparse does, and creates nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import textwrap
import time
from pathlib import Path

from . import EXPERIMENTS, run
from ._io import BACKENDS, Arrays, pyplot

DESCRIPTION = """\
Reproduce the experiments of the Kernelized Wasserstein Natural Gradient paper.

  consistency     relative error of KWNG against closed forms, versus N, d and M
  bandwidth       error versus the kernel bandwidth; Gaussian vs rational-quadratic kernel
  trajectory      W2 minimisation in a badly scaled parametrisation: exact NG, KWNG, GD
  classification  ill-conditioned digits classification: SGD, Adam, KWNG (D = I, D = diag)

Each writes a tidy CSV (one row per run) and PNG plots into --out and prints a summary.
`python -m wngkernels.experiments NAME --help` says what NAME reproduces, needs and writes.
"""

#: name → (what it reproduces, what it needs, how long, what it writes); timings on 2 CPU cores.
ABOUT = {
    "consistency": (
        "The paper's consistency plots: the relative error of the KWNG estimate against the exact "
        "Wasserstein natural gradient of the seed's Gaussian and hypersphere models, as the number of "
        "samples N grows (M = floor(d sqrt N)) and as the basis size M grows.",
        "the core (NumPy) and matplotlib",
        "--quick about 5 s, the full run about 4-5 minutes",
        "consistency.csv, consistency_vs_N.png, consistency_vs_M.png"),
    "bandwidth": (
        "The paper's kernel-sensitivity and kernel-ablation slides: the error against the bandwidth "
        "(log_bandwidth of the authors' rule), for the Gaussian and the rational-quadratic kernel.",
        "the core (NumPy) and matplotlib",
        "--quick about 3 s, the full run about 2-3 minutes",
        "bandwidth.csv, bandwidth.png"),
    "trajectory": (
        "The paper's trajectory figure: minimising W2 to a target Gaussian in a badly scaled "
        "parametrisation with the exact natural gradient (ng_exact), KWNG in that parametrisation "
        "(kwng, kwng_diag) and in the well-scaled one mapped back (kwng_theta), and gradient descent.",
        "the core (NumPy) and matplotlib",
        "--quick about 3 s, the full run about 1 minute",
        "trajectory.csv, trajectory.png"),
    "classification": (
        "The paper's ill-conditioned classification on scikit-learn's digits: an MLP whose logits are "
        "scaled by logspace(-6, 1, 10), trained with SGD, Adam and KWNG (D = I and D = diag); "
        "--well-conditioned drops the scaling (the contrast run).",
        "PyTorch (pip install -c constraints.txt -e \".[torch]\") and scikit-learn (the experiments extra)",
        "--quick about 10 s, the full run about 1 minute",
        "classification.csv and classification.png (classification_wellcond.* with --well-conditioned)"),
}


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0; got {value}")
    return value


def _out(text: str) -> Path:
    """An output directory that exists or can be created; nothing is created here."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a directory; got an empty path")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is an existing file, not a directory")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{text!r} lies under {str(parent)!r}, which is a file")
            break
    return path


def parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per experiment (exposed for the docs and the tests)."""
    p = argparse.ArgumentParser(prog="python -m wngkernels.experiments", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="name", metavar="NAME", required=True,
                           help=f"one of: {', '.join(EXPERIMENTS)}")
    for name in EXPERIMENTS:
        what, needs, takes, writes = ABOUT[name]
        description = "\n".join([textwrap.fill(what, 92), "", textwrap.fill(f"Needs: {needs}.", 92),
                                 f"Takes: {takes}.", textwrap.fill(f"Writes into --out: {writes}.", 92)])
        e = sub.add_parser(name, description=description, help=what.split(":")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        e.add_argument("--out", required=True, metavar="DIR", type=_out, help="output directory (created)")
        e.add_argument("--quick", action="store_true", help="small sizes (" + takes.split(",")[0] + ")")
        if name == "classification":
            e.add_argument("--well-conditioned", action="store_true",
                           help="drop the logit scaling (the contrast run)")
            e.add_argument("--device", default=None, metavar="DEV",
                           help="torch device for the network, e.g. cpu or cuda (default: cpu)")
        else:
            e.add_argument("--backend", choices=BACKENDS, default="numpy",
                           help="array library the estimator runs on (default: numpy)")
            e.add_argument("--device", default=None, metavar="DEV",
                           help="device for torch/cupy, e.g. cpu, cuda, cuda:1 (default: the library's)")
        e.add_argument("--seed", type=_seed, default=0, metavar="S",
                       help="base random seed, >= 0 (default: 0)")
        e.add_argument("--no-progress", action="store_true", help="no progress bars")
        # "tiny" exists for the test suite; not part of the documented interface
        e.add_argument("--size", choices=("full", "quick", "tiny"), default=None, help=argparse.SUPPRESS)
    return p


def _check(p: argparse.ArgumentParser, args) -> None:
    """Refuse what would fail later — a missing library, an unusable backend or device."""
    try:
        pyplot()
        if args.name == "classification":
            for module, extra in (("torch", "torch"), ("sklearn", "experiments")):
                if importlib.util.find_spec(module) is None:
                    raise ImportError(f"classification needs {module}: pip install -c constraints.txt "
                                      f"-e \".[{extra}]\"")
            Arrays("torch", args.device)
        else:
            if args.device is not None and args.backend == "numpy":
                raise ValueError(f"--device {args.device} needs --backend torch or cupy "
                                 "(numpy runs on the CPU)")
            Arrays(args.backend, args.device)
    except (ValueError, TypeError, ImportError) as exc:
        p.error(str(exc))


def main(argv=None) -> int:
    """Parse ``argv``, run the experiment, print its summary; return the exit status."""
    p = parser()
    args = p.parse_args(argv)
    _check(p, args)
    size = args.size or ("quick" if args.quick else "full")
    kwargs = dict(size=size, device=args.device, seed=args.seed, out=args.out,
                  show_progress=not args.no_progress)
    if args.name == "classification":
        kwargs.update(well_conditioned=args.well_conditioned, backend="torch")
    else:
        kwargs["backend"] = args.backend
    start = time.perf_counter()
    result = run(args.name, **kwargs)
    print(f"\n{args.name} ({size}, backend {kwargs['backend']}) done in {time.perf_counter() - start:.1f} s; "
          f"wrote {', '.join(str(f) for f in result.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

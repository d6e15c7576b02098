"""Reproductions of the KWNG paper's experiments (Arbel et al., ICLR 2020).

Run from the command line::

    python -m wngkernels.experiments NAME [--quick] [--backend numpy|torch|cupy] [--device DEV]
                                          [--seed S] --out DIR

with ``NAME`` one of :data:`EXPERIMENTS`. Each experiment is also a module with a
``run(size=..., backend=..., device=..., seed=..., out=...)`` function returning a
:class:`~wngkernels.experiments._io.Result`. Importing this package is light: plotting,
progress bars, PyTorch and scikit-learn are imported only when an experiment runs.
"""

from __future__ import annotations

import importlib

__all__ = ["EXPERIMENTS", "run"]

#: Experiment names, each a module of this package.
EXPERIMENTS = ("consistency", "bandwidth", "trajectory", "classification")


def run(name: str, **kwargs):
    """Run experiment ``name`` with the keyword arguments of its module's ``run``.

    Parameters
    ----------
    name : str
        One of :data:`EXPERIMENTS`.
    **kwargs
        ``size``, ``backend``, ``device``, ``seed``, ``out``, … (see each module).

    Returns
    -------
    Result
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__name__}.{name}").run(**kwargs)

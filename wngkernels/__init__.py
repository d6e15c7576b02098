"""wngkernels — the Kernelized Wasserstein Natural Gradient (Arbel et al., ICLR 2020).

A backend-agnostic core (NumPy, CuPy, PyTorch and any array-API library) with kernels
and their analytic derivatives, Nyström subsampling and the KWNG estimator; the
PyTorch preconditioner lives in :mod:`wngkernels.torch`.
"""

from .bandwidth import AuthorsRule, MedianHeuristic
from .estimator import (
    WhitenedSolver,
    cc_gram,
    cotangents,
    damping_from_whitened,
    factorize_whitened,
    k_gram,
    kwng_direction,
    metric_apply,
    solve_whitened,
    t_matrix,
    whiten,
)
from .kernels import Gaussian, Kernel, RationalQuadratic
from .nystrom import NystromBasis, nystrom_basis

__all__ = [
    "AuthorsRule",
    "Gaussian",
    "Kernel",
    "MedianHeuristic",
    "NystromBasis",
    "RationalQuadratic",
    "WhitenedSolver",
    "cc_gram",
    "cotangents",
    "damping_from_whitened",
    "factorize_whitened",
    "k_gram",
    "kwng_direction",
    "metric_apply",
    "nystrom_basis",
    "solve_whitened",
    "t_matrix",
    "whiten",
]

__version__ = "0.1.0"

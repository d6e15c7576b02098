"""wngkernels — the Kernelized Wasserstein Natural Gradient (Arbel et al., ICLR 2020).

A backend-agnostic core (NumPy, CuPy, PyTorch and any array-API library) with kernels
and their analytic derivatives, Nyström subsampling and the KWNG estimator; the
PyTorch preconditioner lives in :mod:`wngkernels.torch`.
"""

from .bandwidth import AuthorsRule, MedianHeuristic
from .estimator import cc_gram, cotangents, k_gram, kwng_direction, metric_apply, t_matrix
from .kernels import Gaussian, Kernel, RationalQuadratic
from .nystrom import NystromBasis, nystrom_basis
from .solve import WhitenedSolver, damping_from_whitened, factorize_whitened, solve_whitened, whiten

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

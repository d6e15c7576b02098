"""wngkernels — the Kernelized Wasserstein Natural Gradient (Arbel et al., ICLR 2020).

A backend-agnostic core (NumPy, CuPy, PyTorch and any array-API library) with kernels
and their analytic derivatives, Nyström subsampling and the KWNG estimator; the
PyTorch preconditioner lives in :mod:`wngkernels.torch`.
"""

from .bandwidth import AuthorsRule, MedianHeuristic
from .kernels import Gaussian, Kernel, RationalQuadratic

__all__ = [
    "AuthorsRule",
    "Gaussian",
    "Kernel",
    "MedianHeuristic",
    "RationalQuadratic",
]

__version__ = "0.1.0"

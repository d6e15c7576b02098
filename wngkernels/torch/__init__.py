"""PyTorch edge of wngkernels: the batched VJP for ``T`` and the :class:`KWNG` preconditioner.

Needs ``torch`` (the optional extra ``wngkernels[torch]``); the core never imports it.
"""

from ._batched import flatten_outputs, jacobian_vjp_rows, t_matrix_and_grad
from .preconditioner import KWNG

__all__ = ["KWNG", "flatten_outputs", "jacobian_vjp_rows", "t_matrix_and_grad"]

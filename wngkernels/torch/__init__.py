"""PyTorch edge of wngkernels: the batched VJP for ``T`` and the :class:`KWNG` preconditioner.

Needs ``torch`` (the optional extra ``wngkernels[torch]``); the core never imports it.
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # say which extra brings it
    raise ImportError(
        "wngkernels.torch needs PyTorch, which is not installed: from a clone, "
        'pip install -c constraints.txt -e ".[torch]" (or pip install torch)'
    ) from exc

from ._batched import flatten_outputs, jacobian_vjp_rows, t_matrix_and_grad  # noqa: E402
from .preconditioner import KWNG  # noqa: E402

__all__ = ["KWNG", "flatten_outputs", "jacobian_vjp_rows", "t_matrix_and_grad"]

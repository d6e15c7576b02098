r"""Dask edge of wngkernels: the estimator on samples and Jacobians that do not fit in memory.

Needs ``dask[array]`` (the optional extra ``wngkernels[dask]``); the core never imports it.

The estimator is made of sums over the samples, :math:`\sum_n H_nH_n^\top` ``(M, M)`` and
:math:`\sum_{n,i} H_n[:, i]\,J_{n,i,:}` ``(M, q)``, and of small ``M × M`` steps. Here the long
axis ``N`` stays chunked and lazy:

1. one ``dask.compute`` over the samples only (``N · d``): their finiteness, mean and largest
   deviation (the core's centring and units), the bandwidth rule's statistics, the basis points
   :math:`Y_m = X_{i_m}`, and any small Dask argument;
2. one ``dask.compute`` of the sums, block by block with the core's own arithmetic, merged in the
   graph (the client receives one ``(M, M)`` and one ``(M, q)`` matrix) — the one pass over the
   Jacobian;
3. whitening, damping and the solve on NumPy, by the core's functions.

Results are Dask arrays of one chunk wrapping the NumPy result (``dask.array.from_array``):
already computed, small, and of the library of the inputs. Values agree with the core on the
same data to rounding. Any scheduler works (threads, processes, ``dask.distributed``).
"""

try:
    import dask.array  # noqa: F401
except ImportError as exc:  # say which extra brings it
    raise ImportError(
        "wngkernels.dask needs Dask, which is not installed: from a clone, "
        'pip install -c constraints.txt -e ".[dask]" (or pip install "dask[array]")'
    ) from exc

from ._estimator import cc_gram, kwng_direction, metric_apply, t_matrix  # noqa: E402

__all__ = ["cc_gram", "kwng_direction", "metric_apply", "t_matrix"]

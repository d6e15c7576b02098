"""Root conftest: doctest collection of ``wngkernels`` skips an edge whose library is absent
(``wngkernels/torch`` without PyTorch, ``wngkernels/dask`` without Dask)."""

import importlib.util

collect_ignore = [f"wngkernels/{edge}" for edge, module in (("torch", "torch"), ("dask", "dask"))
                  if importlib.util.find_spec(module) is None]

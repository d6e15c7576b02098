"""Root conftest: doctest collection of ``wngkernels`` skips the PyTorch edge when torch is absent."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("torch") else ["wngkernels/torch"]

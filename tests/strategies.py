"""Hypothesis strategies shared by the test modules."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays


def points(n_max=4):
    """(x, y) float64 point clouds of one dimension d in 1..8, entries in [-2, 2]."""
    return st.integers(1, 8).flatmap(
        lambda d: st.tuples(
            arrays(np.float64, st.tuples(st.integers(1, n_max), st.just(d)),
                   elements=st.floats(-2, 2, allow_nan=False)),
            arrays(np.float64, st.tuples(st.integers(1, n_max), st.just(d)),
                   elements=st.floats(-2, 2, allow_nan=False)),
        )
    )

import numpy as np
import pytest

from wngkernels import NystromBasis, nystrom_basis


def test_seeded_and_identical_for_int_and_generator():
    a = nystrom_basis((50, 4), 10, rng=3)
    b = nystrom_basis((50, 4), 10, rng=np.random.default_rng(3))
    assert a == b
    assert nystrom_basis((50, 4), 10, rng=4) != a


def test_points_distinct_when_m_le_n():
    b = nystrom_basis((30, 5), 30, rng=0)
    assert len(set(b.indices.tolist())) == 30
    assert b.dims.min() >= 0 and b.dims.max() < 5


def test_pairs_distinct_when_m_gt_n():
    b = nystrom_basis((10, 3), 25, rng=1)
    pairs = set(zip(b.indices.tolist(), b.dims.tolist(), strict=False))
    assert len(pairs) == 25
    assert b.indices.max() < 10 and b.dims.max() < 3


def test_full_basis_is_exact():
    assert nystrom_basis((6, 2), 12, rng=0) == NystromBasis.exact(6, 2)
    assert nystrom_basis(np.zeros((6, 2)), None, exact=True) == NystromBasis.exact(6, 2)
    e = NystromBasis.exact(3, 2)
    assert e.indices.tolist() == [0, 0, 1, 1, 2, 2] and e.dims.tolist() == [0, 1] * 3


def test_coordinates_are_uniform():
    b = nystrom_basis((100000, 4), 40000, rng=2)
    counts = np.bincount(b.dims, minlength=4) / 40000
    assert np.abs(counts - 0.25).max() < 0.01  # ~5 standard deviations


def test_basis_is_immutable():
    b = NystromBasis([0, 1], [1, 0])
    with pytest.raises(ValueError):
        b.indices[0] = 5


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        (((5, 2), 0), ValueError, r"num_basis must be in \[1, N·d = 10\]; got 0"),
        (((5, 2), 11), ValueError, r"num_basis must be in \[1, N·d = 10\]; got 11"),
        (((5, 2), 2.0), TypeError, "num_basis must be an int"),
        (((5,), 2), ValueError, r"samples must be 2-D \(N, d\)"),
        (((0, 2), 1), ValueError, r"samples must be 2-D \(N, d\) and non-empty"),
    ],
)
def test_bad_arguments_raise(args, exc, match):
    with pytest.raises(exc, match=match):
        nystrom_basis(*args)


def test_bad_basis_raises():
    with pytest.raises(ValueError, match="same length"):
        NystromBasis([0, 1], [0])
    with pytest.raises(ValueError, match="at least one pair"):
        NystromBasis([], [])
    with pytest.raises(ValueError, match=">= 0"):
        NystromBasis([0, -1], [0, 0])
    with pytest.raises(TypeError, match="indices must hold integers"):
        NystromBasis([0.5], [0])
    with pytest.raises(ValueError, match="basis indices must be < N = 3"):
        NystromBasis([3], [0]).check(3, 2)

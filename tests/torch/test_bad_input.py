"""Bad input and odd situations at the PyTorch edge: a clear error, or a counted, documented
safe result (half-precision gradients, checkpoints, mistaken arguments)."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from wngkernels import nystrom_basis  # noqa: E402
from wngkernels.torch import KWNG, t_matrix_and_grad  # noqa: E402

from .helpers import make_model  # noqa: E402


def _mse(out):
    return (out ** 2).mean()


def _trained(seed=0, steps=3, **options):
    """A KWNG over a small MLP after a few steps (a cache with ``refresh_every > 1``)."""
    model, x = make_model("mlp", torch.float64, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kwng = KWNG(model.parameters(), optimizer=opt, **options)
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        kwng.precondition(out, _mse(out))
        opt.step()
    return model, x, opt, kwng


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a):
        return np.isnan(b)
    return a == b


# -- the same mistake, the same exception ---------------------------------------------------------

@pytest.mark.parametrize("value, error", [("5", TypeError), (5.0, TypeError), (True, TypeError),
                                          (0, ValueError), (-3, ValueError)])
def test_num_basis_mistakes_raise_the_same_exception_in_kwng_and_the_core(value, error):
    model, _ = make_model("mlp")
    with pytest.raises(error, match="num_basis"):
        KWNG(model.parameters(), num_basis=value)
    with pytest.raises(error, match="num_basis"):
        nystrom_basis((10, 3), value, rng=0)


@pytest.mark.parametrize("loss, error", [(1.0, TypeError), ("x", TypeError), (None, TypeError),
                                         (torch.ones(3), ValueError)])
def test_a_loss_that_is_not_a_scalar_tensor_gets_one_exception_everywhere(loss, error):
    model, x = make_model("mlp")
    kwng = KWNG(model.parameters(), generator=0)
    out = model(x)
    with pytest.raises(error, match="loss must be a scalar tensor"):
        kwng.precondition(out, loss)
    if loss is not None:  # capture's loss is optional
        with pytest.raises(error, match="loss must be a scalar tensor"):
            kwng.capture(out, loss)
    from wngkernels import Gaussian
    with pytest.raises(error, match="loss must be a scalar tensor"):
        t_matrix_and_grad(out, loss, list(model.parameters()), kernel=Gaussian(1.0),
                          basis=nystrom_basis((12, 3), 3, rng=0))
    assert kwng._pending is None  # nothing half-captured


# -- half precision -------------------------------------------------------------------------------

def test_a_direction_too_long_for_float16_gradients_falls_back_to_g_and_is_counted():
    """With ``clip_norm=None`` and a tiny ε, ``w`` has entries beyond float16's 65504: writing it
    would put Inf into ``.grad``. KWNG writes ``g`` instead and counts a fallback."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).half()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    kwng = KWNG(model.parameters(), optimizer=opt, clip_norm=None, eps=1e-10, adaptive_eps=False,
                eps_bounds=(1e-12, 1.0))
    x, y = torch.randn(32, 6).half(), torch.randint(0, 3, (32,))
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out.float(), y)
    g = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    assert kwng.precondition(out, loss)
    assert kwng.num_fallbacks == 1
    assert all(torch.equal(gi, p.grad) for gi, p in zip(g, model.parameters(), strict=True))
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_float16_gradients_keep_the_direction_when_it_fits():
    """The guard reads ``w`` only where a gradient is narrower than ``w`` and changes nothing
    when ``w`` fits: the float16 ``.grad`` is the float32 direction, rounded."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    half = copy.deepcopy(model).half()
    x = torch.randn(16, 6)
    ref = KWNG(model.parameters(), generator=3, adaptive_eps=False)
    out = model(x.half().float())
    basis = nystrom_basis((16, 3), 5, rng=1)
    ref.precondition(out, _mse(out), basis=basis)
    kwng = KWNG(half.parameters(), generator=3, adaptive_eps=False)
    out = half(x.half())
    kwng.precondition(out, _mse(out.float()), basis=basis)
    assert kwng.num_fallbacks == 0
    w = torch.cat([p.grad.reshape(-1).float() for p in half.parameters()])
    w_ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert float(torch.dot(w, w_ref) / w.norm() / w_ref.norm()) > 0.99


# -- checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", ["MT19937", "Philox", "SFC64", "PCG64DXSM", "PCG64"])
def test_any_numpy_bit_generator_round_trips_through_weights_only_load(bits):
    rng = np.random.Generator(getattr(np.random, bits)(11))
    model, x, opt, kwng = _trained(generator=rng)
    buf = io.BytesIO()
    torch.save(kwng.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model2 = copy.deepcopy(model)
    fresh = KWNG(model2.parameters(), optimizer=torch.optim.SGD(model2.parameters(), lr=0.05), generator=0)
    fresh.load_state_dict(state)
    for k in (kwng, fresh):  # the next draws agree
        out = (model if k is kwng else model2)(x)
        k.precondition(out, _mse(out))
    assert np.array_equal(kwng.last_basis.indices, fresh.last_basis.indices)
    assert np.array_equal(kwng.last_basis.dims, fresh.last_basis.dims)


def test_a_callers_numpy_generator_is_rewound_in_place():
    rng = np.random.Generator(np.random.MT19937(2))
    _, _, _, kwng = _trained(generator=rng, steps=1)
    state = kwng.state_dict()
    expected = rng.random()
    kwng.load_state_dict(state)
    assert kwng._draws.source is rng and rng.random() == expected


def _broken(state, what):
    state = copy.deepcopy(state)
    if what == "missing ratio":
        del state["ratio"]
    elif what == "num_basis":
        state["hyperparameters"]["num_basis"] = 8
    elif what == "other q":
        state["cache"]["t_white"] = torch.zeros(state["cache"]["t_white"].shape[0], 7, dtype=torch.float64)
    elif what == "other parameters":
        state["cache"]["active"] = [0, 1, 2, 3, 9]
    elif what == "rng":
        state["rng"] = {"bit_generator": "NoSuchGenerator", "state": {}}
    elif what == "rng kind":
        state["rng"] = {"bit_generator": "SeedSequence", "state": {}}
    elif what == "step":
        state["step"] = -1
    elif what == "eps_scale":
        state["eps_scale"] = float("nan")
    elif what == "ratio count":
        state["ratio"]["count"] = "2"
    elif what == "cache step":
        state["cache"]["step"] = state["step"] + 5
    elif what == "damping":
        state["cache"]["damping"] = torch.ones(3, dtype=torch.float64)
    return state


@pytest.mark.parametrize("what, match", [
    ("missing ratio", "missing 'ratio'"),
    ("num_basis", "num_basis=8"),
    ("other q", r"t_white.*other parameters"),
    ("other parameters", "active"),
    ("rng", "rng"),
    ("rng kind", "rng"),
    ("step", "step"),
    ("eps_scale", "eps_scale"),
    ("ratio count", "ratio.count"),
    ("cache step", "cache"),
    ("damping", "damping"),
])
def test_a_bad_checkpoint_is_refused_before_anything_changes(what, match):
    _, _, _, source = _trained(seed=1, steps=4, refresh_every=3, generator=4)
    _, _, _, target = _trained(seed=2, steps=2, refresh_every=3, generator=np.random.default_rng(9))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(_broken(source.state_dict(), what))
    assert _same(target.state_dict(), before)  # atomic: nothing was half-loaded


def test_a_checkpoint_that_is_not_a_dict_is_a_type_error():
    _, _, _, kwng = _trained(steps=1)
    with pytest.raises(TypeError, match="state must be a dict"):
        kwng.load_state_dict([("step", 1)])


def test_a_cache_from_a_larger_model_is_refused():
    """``refresh_every=10`` caches ``T̃`` of the saved model's ``q``; another model's KWNG refuses it."""
    _, _, _, big = _trained(refresh_every=10, generator=0)
    small = torch.nn.Linear(4, 3)
    kwng = KWNG(small.parameters(), refresh_every=10, generator=0)
    with pytest.raises(ValueError, match="other parameters"):
        kwng.load_state_dict(big.state_dict())
    assert kwng._cache is None and kwng.step_count == 0


def test_options_after_params_are_keyword_only():
    model, _ = make_model("mlp")
    with pytest.raises(TypeError, match="positional"):
        KWNG(model.parameters(), 5)


def test_a_refresh_from_a_non_finite_cc_is_dropped_and_other_failures_are_raised():
    """``refreshed`` reads ``C Cᵀ``'s finiteness only through the whitening's first read: a
    non-finite ``C Cᵀ`` gives no refresh (the step falls back to ``g``), while a failure with a
    finite ``C Cᵀ`` (here a non-finite ``K`` with ``lam > 0``) still reaches the caller."""
    from types import SimpleNamespace

    from wngkernels import AuthorsRule, Gaussian
    from wngkernels.torch._direction import refreshed
    from wngkernels.torch._state import _Pending

    m, q = 3, 7
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, m, generator=gen, dtype=torch.float64)
    cc, t = a @ a.T, torch.randn(m, q, generator=gen, dtype=torch.float64)
    nan = torch.full((m, m), float("nan"), dtype=torch.float64)
    nan_k = SimpleNamespace(basis_gram=lambda points, dims: nan)
    pend = _Pending(rng_state=None, refresh=True, active=(0,), kernel=nan_k)
    options = dict(damping="jacobian", floor=1e-8, step=0)
    assert refreshed(cc, t, pend, 1.0, lam=0.0, **options) is not None
    bad = cc.clone()
    bad[0, 1] = float("nan")
    assert refreshed(bad, t, pend, 1.0, lam=0.0, **options) is None
    with pytest.raises(ValueError, match="k must be finite"):
        refreshed(cc, t, pend, 1.0, lam=0.1, **options)
    # a bandwidth left on the device that proved unusable (NaN) drops the refresh where K needs it
    pend.kernel, pend.ell = Gaussian(AuthorsRule()), torch.tensor(float("nan"), dtype=torch.float64)
    assert refreshed(bad, t, pend, 1.0, lam=0.1, **options) is None

"""``KWNG``: the direction against the core, safety policies, adaptive ε, checkpoints, errors."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import wngkernels.torch._capture as capture  # noqa: E402
import wngkernels.torch.preconditioner as pre  # noqa: E402
from wngkernels import (  # noqa: E402
    AuthorsRule,
    Gaussian,
    NystromBasis,
    RationalQuadratic,
    kwng_direction,
    solve_whitened,
)
from wngkernels.torch import KWNG  # noqa: E402

from .helpers import DEVICES, MODELS, dense_jacobian, make_model, rel_err, to_np  # noqa: E402

# one table of configurations; the tests below loop over it
CONFIGS = [
    dict(damping="jacobian", lam=0.0, refresh_every=1, adaptive_eps=True),
    dict(damping="identity", lam=0.0, refresh_every=1, adaptive_eps=False),
    dict(damping="jacobian", lam=1e-3, refresh_every=1, adaptive_eps=True),
    dict(damping="jacobian", lam=0.0, refresh_every=3, adaptive_eps=True),
]
CONFIG_IDS = [f"{c['damping']}-lam{c['lam']}-refresh{c['refresh_every']}" for c in CONFIGS]


def _loss(out, y):
    outs = out if isinstance(out, tuple) else (out,)
    return sum(((o.reshape(o.shape[0], -1) - y[:, None]) ** 2).mean() for o in outs)


def _grads(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS[:3], ids=CONFIG_IDS[:3])
def test_direction_matches_core_with_same_basis_and_bandwidth(config, dtype, device):
    model, x = make_model("mlp", dtype, device)
    params = list(model.parameters())
    y = torch.randn(x.shape[0], dtype=dtype, device=device)
    kwng = KWNG(params, num_basis=7, eps=1e-3, clip_norm=None, generator=3, lr=0.1,
                **{k: v for k, v in config.items() if k != "refresh_every"})
    out = model(x)
    assert kwng.precondition(out, _loss(out, y))
    w = _grads(params)
    g = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(_loss(model(x), y), params)])
    # the core in the same dtype: float32 rounding in T is amplified by the solve's conditioning
    samples, jac = dense_jacobian(model, x, params)
    w_core = kwng_direction(g, samples, kernel=Gaussian(kwng.last_kernel.bandwidth), basis=kwng.last_basis,
                            eps=1e-3, lam=config["lam"], damping=config["damping"], jacobian=jac)
    assert w.dtype == dtype and w.device.type == device
    assert rel_err(to_np(w), to_np(w_core)) < (1e-10 if dtype == torch.float64 else 2e-3)


@pytest.mark.parametrize("sync_free", [False, True], ids=["default", "sync_free"])
@pytest.mark.parametrize("name", MODELS)
def test_any_model_trains_and_matches_core(name, sync_free):
    """Shared, unused and frozen parameters; with ``sync_free`` the unseen-parameter rule is applied
    on the device and the factors are Cholesky's."""
    model, x = make_model(name, torch.float64)
    params = list(model.parameters())
    y = torch.randn(x.shape[0], dtype=torch.float64)
    kwng = KWNG(params, num_basis=6, eps=1e-2, clip_norm=None, generator=0, lr=0.1, sync_free=sync_free)
    out = model(x)
    kwng.precondition(out, _loss(out, y))
    present = [p for p in params if p.grad is not None]
    w = _grads(present)
    g = torch.autograd.grad(_loss(model(x), y), present)
    samples, jac = dense_jacobian(model, x, present)
    w_core = kwng_direction(torch.cat([gi.reshape(-1) for gi in g]), samples,
                            kernel=Gaussian(kwng.last_kernel.bandwidth), basis=kwng.last_basis, eps=1e-2,
                            damping="jacobian", jacobian=jac)
    # float64; the solve amplifies rounding by about ‖Ĝ‖/ε (1.5e-9 seen with another BLAS)
    assert rel_err(to_np(w), to_np(w_core)) < 1e-7


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_a_few_steps_lower_the_loss(config):
    model, x = make_model("mlp", torch.float64, seed=1)
    y = torch.randn(x.shape[0], dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kwng = KWNG(model.parameters(), optimizer=opt, generator=0, **config)
    first = None
    for _ in range(15):
        out = model(x)
        loss = _loss(out, y)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        kwng.precondition(out, loss)
        opt.step()
    assert float(_loss(model(x), y).detach()) < 0.8 * first
    assert kwng.num_fallbacks == 0


def test_frozen_and_gradless_parameters_are_untouched():
    model, x = make_model("two_heads", torch.float64)
    model.h1.bias.requires_grad_(False)
    y = torch.randn(x.shape[0], dtype=torch.float64)
    frozen, unused = model.h1.bias.detach().clone(), model.unused.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwng = KWNG(model.parameters(), optimizer=opt, generator=0)
    for _ in range(3):
        out = model(x)
        opt.zero_grad()
        assert kwng.precondition(out, _loss(out, y))
        opt.step()
    assert model.h1.bias.grad is None and model.unused.weight.grad is None
    assert torch.equal(model.h1.bias, frozen) and torch.equal(model.unused.weight, unused)


def test_zero_gradient_moves_nothing():
    model, x = make_model("mlp", torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwng = KWNG(model.parameters(), optimizer=opt, generator=0)
    out = model(x)
    opt.zero_grad()
    kwng.precondition(out, 0.0 * out.sum())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert kwng.num_fallbacks == 0  # w = 0 is the direction for g = 0, not a fallback


def test_direction_is_clipped_to_clip_norm():
    model, x = make_model("mlp", torch.float64)
    y = 10 * torch.randn(x.shape[0], dtype=torch.float64)
    free = KWNG(model.parameters(), clip_norm=None, generator=5, eps=1e-4)
    out = model(x)
    free.precondition(out, _loss(out, y))
    w = _grads(model.parameters()).clone()
    assert float(w.norm()) > 0.5
    for p in model.parameters():
        p.grad = None
    clipped = KWNG(model.parameters(), clip_norm=0.5, generator=5, eps=1e-4)
    out = model(x)
    clipped.precondition(out, _loss(out, y))
    np.testing.assert_allclose(to_np(_grads(model.parameters())), to_np(w * 0.5 / w.norm()), rtol=1e-12)


def _nan_t(real, num_basis=5):
    """``_rows_from_grads`` with ``T``'s rows NaN: the loss's row (fused into the backward) stays finite."""
    def rows_from_grads(*args, **kwargs):
        rows = real(*args, **kwargs).clone()
        rows[:num_basis] = math.nan
        return rows
    return rows_from_grads


def test_falls_back_to_g_on_injected_nan_in_t(monkeypatch):
    model, x = make_model("mlp", torch.float64)
    y = torch.randn(x.shape[0], dtype=torch.float64)
    monkeypatch.setattr(capture, "_rows_from_grads", _nan_t(capture._rows_from_grads))
    kwng = KWNG(model.parameters(), clip_norm=None, generator=0)
    out = model(x)
    assert kwng.precondition(out, _loss(out, y))
    g = torch.autograd.grad(_loss(model(x), y), list(model.parameters()))
    g = torch.cat([gi.reshape(-1) for gi in g])
    np.testing.assert_allclose(to_np(_grads(model.parameters())), to_np(g), rtol=1e-12, atol=1e-15)
    assert kwng.num_fallbacks == 1


def _counting_reads(m, reads):
    """Count the host reads of tensors (``tolist``, ``item``, ``float`` ...) into ``reads``."""
    for name in ("tolist", "item", "__float__", "__bool__", "__int__"):
        real = getattr(torch.Tensor, name)

        def wrapped(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)
        m.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("whiten", [True, False], ids=["whitened-cotangents", "whitened-after"])
@pytest.mark.parametrize("kernel", [None, Gaussian(0.7)], ids=["authors-rule", "fixed"])
@pytest.mark.parametrize("fuse", [True, False], ids=["precondition", "capture"])
def test_what_a_refresh_reads_before_the_batched_backward(monkeypatch, kernel, fuse, whiten):
    """A single process draws the basis and evaluates the bandwidth rule without reading the device.
    Where the cotangents are whitened (one micro-batch, no grad scaler: ``C Cᵀ`` is complete before
    the backward) the whitening reads ``max |C Cᵀ|`` then, once (the GPU has only the forward pass
    queued); otherwise (accumulation, a grad scaler, half-precision outputs) the backward is queued
    with no read at all. Either way the direction is the core's with the bandwidth then reported."""
    if not whiten:
        monkeypatch.setattr(KWNG, "_whitens_cotangents", lambda self, outputs: False)
    model, x = make_model("mlp", torch.float64)
    y = torch.randn(x.shape[0], dtype=torch.float64)
    kwng = KWNG(model.parameters(), kernel=kernel, eps=1e-3, clip_norm=None, adaptive_eps=False, generator=0)
    out = model(x)
    loss = _loss(out, y)
    reads = []
    with monkeypatch.context() as m:
        _counting_reads(m, reads)
        if fuse:
            assert kwng._capture(out, loss, None, fuse=True)  # .grad filled by the fused backward
        else:
            kwng.capture(out, loss)
    assert reads == (["__float__"] if whiten else [])
    if not fuse:
        loss.backward()
    g = _grads(model.parameters()).clone()
    assert kwng.step()
    ell = kwng.last_kernel.bandwidth
    samples, jac = dense_jacobian(model, x, list(model.parameters()))
    rule = AuthorsRule() if kernel is None else (lambda y, x: 0.7)
    assert ell == rule(samples[kwng.last_basis.indices], samples)  # the core rule, read on the host
    want = kwng_direction(g, samples, kernel=Gaussian(ell), basis=kwng.last_basis, eps=1e-3,
                          damping="jacobian", jacobian=jac)
    assert rel_err(to_np(_grads(model.parameters())), to_np(want)) < 1e-10


@pytest.mark.parametrize("lam", [0.0, 0.3])
@pytest.mark.parametrize("name", ["mlp", "batchnorm"])
def test_whitened_cotangents_give_the_whitened_t(monkeypatch, name, lam):
    """``T`` is linear in its cotangents, so the backward of the whitened cotangents gives ``T̃``
    itself: over several steps (``ε`` adapting, the basis redrawn) the directions and the cached
    ``T̃`` and ``D`` agree with whitening ``T`` after the backward, with and without ``λ``."""
    runs = {}
    for whiten in (True, False):
        with monkeypatch.context() as m:
            if not whiten:
                m.setattr(KWNG, "_whitens_cotangents", lambda self, outputs: False)
            torch.manual_seed(0)
            model, x = make_model(name, torch.float64)
            y = torch.randn(x.shape[0], dtype=torch.float64)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            kwng = KWNG(model.parameters(), lam=lam, optimizer=opt, window=2, generator=3)
            steps = []
            for _ in range(4):
                opt.zero_grad()
                out = model(x)
                assert kwng.precondition(out, _loss(out, y))
                steps.append((_grads(model.parameters()).clone(), kwng._cache.t_white.clone(),
                              kwng._cache.damping.clone(), kwng.current_eps()))
                opt.step()
            runs[whiten] = steps, kwng.num_fallbacks
    (white, fb_white), (after, fb_after) = runs[True], runs[False]
    assert fb_white == fb_after == 0
    # the two orders of rounding differ at ~1e-10 in the first step (each is that close to the dense
    # float64 direction) and the trajectories they move apart by that much each step
    for (w1, t1, d1, e1), (w2, t2, d2, e2) in zip(white, after, strict=True):
        assert rel_err(to_np(w1), to_np(w2)) < 1e-7
        assert rel_err(to_np(t1), to_np(t2)) < 1e-7 and rel_err(to_np(d1), to_np(d2)) < 1e-7
        assert e1 == pytest.approx(e2, rel=1e-9)


@pytest.mark.parametrize("lam", [0.0, 0.1])
@pytest.mark.parametrize("case", ["equal-outputs", "inf-in-second-micro-batch", "nan-fixed-bandwidth"])
def test_unusable_outputs_drop_the_refresh_and_write_g(case, lam):
    """Outputs the kernel cannot use (all equal: the bandwidth rule gives 0; a non-finite entry in
    any micro-batch) are found on the device, not read before the bandwidth and the kernel rows
    (with one micro-batch, by the whitening of the cotangents; with several, after the backward):
    the refresh is dropped, ``g`` is written and a fallback counted; an unusable bandwidth leaves
    ``last_kernel`` as it was."""
    torch.manual_seed(0)
    model, x = make_model("mlp", torch.float64)
    y = torch.randn(x.shape[0], dtype=torch.float64)
    kernel = Gaussian(0.5) if case == "nan-fixed-bandwidth" else None
    steps = 2 if case == "inf-in-second-micro-batch" else 1
    kwng = KWNG(model.parameters(), kernel=kernel, lam=lam, accumulation_steps=steps, generator=0)
    for _ in range(steps):  # a usable refresh first
        out = model(x)
        kwng.precondition(out, _loss(out, y) / steps)
    before = kwng.last_kernel
    model.zero_grad()
    for k in range(steps):
        out = model(x)
        loss = _loss(out, y) / steps
        bad = out
        if case == "equal-outputs":
            bad = out * 0 + 0.5  # attached, every entry equal (exactly: their mean is 0.5)
        elif k == steps - 1:
            poison = torch.zeros_like(out)
            poison[3, 0] = math.inf if case.startswith("inf") else math.nan
            bad = out + poison  # the loss does not see it: g stays finite
        kwng.capture(bad, loss)
        loss.backward()
    g = _grads(model.parameters()).clone()
    assert kwng.step()
    assert kwng.num_fallbacks == 1 and kwng.num_skipped == 0
    w = _grads(model.parameters())
    assert bool(torch.isfinite(w).all())
    np.testing.assert_allclose(to_np(w), to_np(g * min(1.0, 1.0 / float(g.norm()))), rtol=1e-12)
    if case != "inf-in-second-micro-batch":  # there the first micro-batch gave a usable bandwidth
        assert kwng.last_kernel == before


def test_falls_back_to_g_when_w_is_not_a_descent_direction(monkeypatch):
    """(T̃ᵀT̃ + εD⁻¹)⁻¹ g is always a descent direction in exact arithmetic; the guard is for
    rounding and broken solves, so the solve is replaced by one that points uphill."""
    model, x = make_model("mlp", torch.float64)
    y = torch.randn(x.shape[0], dtype=torch.float64)
    monkeypatch.setattr(pre.KWNG, "_direction", lambda self, cache, g, params, present: -g)
    kwng = KWNG(model.parameters(), clip_norm=None, generator=0)
    out = model(x)
    kwng.precondition(out, _loss(out, y))
    g = torch.autograd.grad(_loss(model(x), y), list(model.parameters()))
    g = torch.cat([gi.reshape(-1) for gi in g])
    np.testing.assert_allclose(to_np(_grads(model.parameters())), to_np(g), rtol=1e-12, atol=1e-15)
    assert kwng.num_fallbacks == 1


@pytest.mark.parametrize("case", ["clipped", "unclipped", "uphill", "nan-t", "zero-gradient"])
def test_the_direction_written_before_the_read_is_the_one_written_after_it(monkeypatch, case):
    """Without a grad scaler, ``.grad`` is written before the step's read wherever the direction is
    known then; the result — ``.grad``, the fallbacks counted, the ``⟨g, w⟩`` the reduction ratio
    keeps, ``ε`` — is the one written after the read (the order a grad scaler, a half-precision
    ``.grad``, a closing ratio window or a missing ``w`` takes), step after step."""
    def run(before):
        order = []
        with monkeypatch.context() as m:
            if not before:
                m.setattr(KWNG, "_writes_early", lambda self, w, grads: False)
            real_write, real_reduce = pre._write, pre.reduce_step
            m.setattr(pre, "_write", lambda *a: order.append("write") or real_write(*a))
            m.setattr(pre, "reduce_step", lambda *a, **k: order.append("read") or real_reduce(*a, **k))
            if case == "uphill":
                m.setattr(pre.KWNG, "_direction", lambda self, cache, g, params, present: -g)
            elif case == "nan-t":
                m.setattr(capture, "_rows_from_grads", _nan_t(capture._rows_from_grads))
            torch.manual_seed(0)
            model, x = make_model("mlp", torch.float64)
            y = 10 * torch.randn(x.shape[0], dtype=torch.float64)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            kwng = KWNG(model.parameters(), optimizer=opt, window=2, eps=1e-4, generator=1,
                        clip_norm=None if case == "unclipped" else 0.5)
            seen = []
            for _ in range(5):
                opt.zero_grad()
                out = model(x)
                loss = 0.0 * out.sum() if case == "zero-gradient" else _loss(out, y)
                assert kwng.precondition(out, loss)
                seen.append((_grads(model.parameters()).clone(), kwng._ratio.prev_gw, kwng.current_eps()))
                opt.step()
        firsts = [order[i] for i in range(0, len(order), 2)]  # each step: one write, one read
        return seen, kwng.num_fallbacks, firsts.count("write")

    (early, fb_early, n_early), (late, fb_late, n_late) = run(True), run(False)
    # written first: every step where ε cannot move (all with a zero gradient: no ratio), none
    # without a w (a non-finite T); in the other run none
    assert n_late == 0 and n_early == {"nan-t": 0, "zero-gradient": 5}.get(case, n_early)
    assert case in ("nan-t", "zero-gradient") or 0 < n_early < 5
    assert fb_early == fb_late == {"uphill": 5, "nan-t": 5}.get(case, 0)
    for (w1, gw1, e1), (w2, gw2, e2) in zip(early, late, strict=True):
        assert torch.equal(w1, w2) and gw1 == gw2 and e1 == e2
    if case == "clipped":
        assert float(early[0][0].norm()) == pytest.approx(0.5, rel=1e-12)


def test_non_finite_gradient_is_skipped_and_never_written():
    model, x = make_model("mlp", torch.float64)
    y = torch.randn(x.shape[0], dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kwng = KWNG(model.parameters(), optimizer=opt, generator=0)
    before = [p.detach().clone() for p in model.parameters()]
    state = kwng.state_dict()
    out = model(x)
    opt.zero_grad()
    bad = _loss(out, y) + (math.inf * model[0].weight).sum()
    assert not kwng.precondition(out, bad)
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    after = kwng.state_dict()
    assert after.pop("num_skipped") == 1 and state.pop("num_skipped") == 0
    assert after == state


def _scripted_run(rs, lr=0.1, window=5, eps0=1e-3, factor=0.85):
    """Run KWNG with losses whose reduction ratios are exactly ``rs``; return (observed, expected) ε."""
    model, x = make_model("mlp", torch.float64)
    y = torch.randn(x.shape[0], dtype=torch.float64)
    kwng = KWNG(model.parameters(), eps=eps0, lr=lr, window=window, eps_factor=factor, generator=0)
    value, expected, observed = 5.0, [], []
    eps, r_window = eps0, []
    for step in range(len(rs) + 1):
        if step > 0:
            gw = kwng.state_dict()["ratio"]["prev_gw"]
            value = value - rs[step - 1] * lr * gw / 2  # so that 2ΔL / (lr ⟨g, w⟩) = rs[step-1]
            r_window.append(rs[step - 1])
            if len(r_window) == window:
                eps = eps / factor if max(r_window) < 0.25 else eps * factor if max(r_window) > 0.75 else eps
                r_window = []
        for p in model.parameters():
            p.grad = None
        out = model(x)
        real = _loss(out, y)
        kwng.precondition(out, real + (value - real.detach()))
        expected.append(eps)
        observed.append(kwng.state_dict()["eps"])
    return observed, expected


def test_adaptive_eps_follows_the_reduction_ratio_rule():
    rs = [1.0, 0.1, 0.2, 0.5, 0.3] + [0.1, 0.2, -1.0, 0.0, 0.24] + [0.5, 0.7, 0.3, 0.26, 0.74] + [0.9] * 5
    observed, expected = _scripted_run(rs)
    np.testing.assert_allclose(observed, expected, rtol=1e-12)
    # down after window 1, up after window 2, unchanged after window 3, down after window 4
    assert expected[5] < expected[0] and expected[10] > expected[5]
    assert expected[15] == expected[10] and expected[20] < expected[15]


def test_eps_stays_within_bounds():
    model, x = make_model("mlp", torch.float64)
    y = torch.randn(x.shape[0], dtype=torch.float64)
    kwng = KWNG(model.parameters(), eps=1e-3, lr=0.1, window=1, eps_bounds=(1e-4, 2e-3), generator=0)
    for step in range(12):  # the loss rises every step: r < 0, ε grows until the upper bound
        for p in model.parameters():
            p.grad = None
        out = model(x)
        real = _loss(out, y)
        kwng.precondition(out, real + (float(step) - real.detach()))
    assert kwng.current_eps() == 2e-3


def _train(kwng, model, opt, batches, on_step=None):
    for i, (x, y) in enumerate(batches):
        out = model(x)
        opt.zero_grad()
        kwng.precondition(out, _loss(out, y))
        opt.step()
        if on_step:
            on_step(i)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_resume_is_bit_identical(config):
    torch.manual_seed(0)
    batches = [(torch.randn(12, 4, dtype=torch.float64), torch.randn(12, dtype=torch.float64))
               for _ in range(8)]
    model, _ = make_model("mlp", torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    kwng = KWNG(model.parameters(), optimizer=opt, generator=11, **config)
    _train(kwng, model, opt, batches[:4])
    sd = kwng.state_dict()
    sd_copy = copy.deepcopy(sd)
    model2 = copy.deepcopy(model)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # SGD would share the momentum buffers
    kwng2 = KWNG(model2.parameters(), optimizer=opt2, generator=999, **config)
    kwng2.load_state_dict(sd)
    assert _equal_state(sd, sd_copy)  # load_state_dict does not mutate its argument
    batches2 = batches[4:]

    def check(i):
        x, y = batches2[i]
        out = model2(x)
        opt2.zero_grad()
        kwng2.precondition(out, _loss(out, y))
        opt2.step()
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))
        assert _equal_state(kwng.state_dict(), kwng2.state_dict())

    _train(kwng, model, opt, batches2, on_step=check)


def _equal_state(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_state(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_checkpoint_survives_torch_save_weights_only():
    model, x = make_model("mlp", torch.float64)
    kwng = KWNG(model.parameters(), lr=0.1, generator=0, refresh_every=2, eps=lambda s: 1e-3 / (1 + s))
    out = model(x)
    kwng.precondition(out, out.square().mean())
    buf = io.BytesIO()
    torch.save(kwng.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert _equal_state(loaded, kwng.state_dict())
    fresh = KWNG(model.parameters(), lr=0.1, refresh_every=2, eps=lambda s: 1e-3 / (1 + s))
    fresh.load_state_dict(loaded)
    assert _equal_state(fresh.state_dict(), kwng.state_dict())


def test_refresh_every_reuses_t_and_computes_only_g(monkeypatch):
    model, x = make_model("mlp", torch.float64)
    y = torch.randn(x.shape[0], dtype=torch.float64)
    calls = []
    real = capture.batched_vjp
    monkeypatch.setattr(capture, "batched_vjp", lambda *a, **k: calls.append(1) or real(*a, **k))
    kwng = KWNG(model.parameters(), refresh_every=3, clip_norm=None, adaptive_eps=False, generator=0)
    for step in range(7):
        for p in model.parameters():
            p.grad = None
        cache = kwng.state_dict()["cache"]
        out = model(x)
        kwng.precondition(out, _loss(out, y))
        assert len(calls) == step // 3 + 1
        if step % 3:  # a reuse step: the direction from the cached T̃ and D and the new g
            g = torch.autograd.grad(_loss(model(x), y), list(model.parameters()))
            g = torch.cat([gi.reshape(-1) for gi in g])
            w = solve_whitened(cache["t_white"], g, eps=1e-5, damping=cache["damping"])
            np.testing.assert_allclose(to_np(_grads(model.parameters())), to_np(w), rtol=1e-12)


def test_a_step_between_refreshes_reads_the_device_once(monkeypatch):
    """Between refreshes, where ``ε`` cannot move, ``step`` reads the device once (the loss, ``g``'s
    finiteness, ``⟨g, w⟩`` and ``‖w‖`` together: on a GPU each read waits for the queued work); at
    the end of a reduction-ratio window twice (the loss first, since ``ε`` may move)."""
    model, x = make_model("mlp", torch.float64)
    y = torch.randn(x.shape[0], dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    kwng = KWNG(model.parameters(), refresh_every=100, optimizer=opt, window=3, generator=0)
    reads, per_step, eps = [], [], []
    for _ in range(8):
        out = model(x)
        loss = _loss(out, y)
        opt.zero_grad()
        kwng.capture(out, loss)
        loss.backward()
        reads.clear()
        with monkeypatch.context() as m:
            _counting_reads(m, reads)
            assert kwng.step()
        per_step.append(len(reads))
        eps.append(kwng.current_eps())
        opt.step()
    # step 0 refreshes; ratios are observed from step 1 on, and windows of 3 close at steps 3 and 6
    assert per_step[1:] == [1, 1, 2, 1, 1, 2, 1]
    assert eps[3] != eps[2] and eps[6] != eps[5]  # those steps did move ε
    assert len(set(eps[:3])) == 1 and len(set(eps[3:6])) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_what_a_refresh_reads_after_the_batched_backward(monkeypatch, dtype):
    """After the batched backward, a float32 refresh queues the damping, ``τ``, ``S`` and the first
    Gram matrix without reading the device (on a GPU they are launched while the backward runs): the
    damping's flag is read only after the first eigen-decompositions, which wait for the device
    anyway, and the step's values once at the end. Float64 ``T̃`` reads the column norms' check first
    (the core's: float64 squares can underflow). The direction is the core's either way."""
    import array_api_compat.torch as xt

    model, x = make_model("mlp", dtype)
    y = torch.randn(x.shape[0], dtype=dtype)
    kwng = KWNG(model.parameters(), eps=1e-3, clip_norm=None, adaptive_eps=False, generator=0)
    out = model(x)
    kwng._capture(out, _loss(out, y), None, fuse=True)
    g = _grads(model.parameters()).clone()
    reads = []
    real_eigh = xt.linalg.eigh
    with monkeypatch.context() as m:
        _counting_reads(m, reads)
        m.setattr(xt.linalg, "eigh", lambda a: reads.append("eigh") or real_eigh(a))
        assert kwng.step()
    first = [] if dtype == torch.float32 else ["__bool__"]
    assert reads == first + ["eigh", "eigh", "__int__", "eigh", "tolist"]
    samples, jac = dense_jacobian(model, x, list(model.parameters()))
    want = kwng_direction(g.double(), samples.double(), kernel=kwng.last_kernel, basis=kwng.last_basis,
                          eps=1e-3, damping="jacobian", jacobian=jac.double())
    assert rel_err(to_np(_grads(model.parameters())).astype(np.float64), to_np(want)) < (
        1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("refresh_every", [1, 10])
def test_a_cuda_step_synchronises_only_where_it_must(monkeypatch, refresh_every):
    """CUDA's own count of a float32 step's synchronising calls (``set_sync_debug_mode``) is the
    count of its reads and eigen-decompositions (each waits for the device) — nothing else waits,
    e.g. no Python number copied from the host by array-api-compat — and those are: an exact step
    reads ``max |C Cᵀ|`` and eigen-decomposes before the batched backward, eigen-decomposes three
    times and reads the damping's flag after it, and reads the step's values at the end; a step
    between refreshes reads once."""
    import traceback
    import warnings

    import array_api_compat.torch as xt

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dev)
    x, y = torch.randn(64, 6, device=dev), torch.randint(0, 4, (64,), device=dev)
    kwng = KWNG(model.parameters(), refresh_every=refresh_every, adaptive_eps=False, generator=0)

    def step():
        for p in model.parameters():
            p.grad = None
        out = model(x)
        assert kwng.precondition(out, torch.nn.functional.cross_entropy(out, y))

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    calls, real_eigh, sites = [], xt.linalg.eigh, []

    def where(message, *args, **kwargs):  # the sync's callers, for the failure message
        if "synchroniz" in str(message):
            sites.append(" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}"
                                     for f in traceback.extract_stack()[-8:-1][::-1]))
    with monkeypatch.context() as m, warnings.catch_warnings():
        _counting_reads(m, calls)
        m.setattr(xt.linalg, "eigh", lambda a: calls.append("eigh") or real_eigh(a))
        warnings.simplefilter("always")
        m.setattr(warnings, "showwarning", where)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            del sites[:]  # not the switch's own warning
            step()
            syncs = len(sites)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    exact = ["__float__", "eigh", "eigh", "eigh", "__int__", "eigh", "tolist"]
    want = ["tolist"] if refresh_every > 1 else exact
    assert calls == want
    assert syncs == len(calls), "\n".join([str(calls)] + sites)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kernel", [None, Gaussian(0.7), RationalQuadratic(AuthorsRule(), alpha=2.0)],
                         ids=["authors-rule", "fixed", "rational-quadratic"])
def test_cuda_graphs_give_the_eager_numbers(kernel):
    """The refresh's first device work replayed from a CUDA graph gives the eager numbers bit for
    bit, step after step (the basis redrawn each time, a short batch taking a graph of its own,
    non-finite outputs dropping the refresh in both), and a graph was indeed replayed."""
    runs = {}
    for graphs in (True, False):
        torch.manual_seed(0)
        dev = torch.device("cuda")
        model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.BatchNorm1d(32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 4)).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        kwng = KWNG(model.parameters(), kernel=kernel, optimizer=opt, generator=0, cuda_graphs=graphs)
        seen = []
        for step in range(6):
            n = 40 if step == 3 else 64
            x, y = torch.randn(n, 6, device=dev), torch.randint(0, 4, (n,), device=dev)
            opt.zero_grad()
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out, y)
            if step == 4:  # an output the kernel cannot take (the loss stays finite): the refresh is dropped
                out = out + torch.where(torch.arange(n, device=dev)[:, None] == 0, math.inf, 0.0)
            assert kwng.precondition(out, loss)
            seen.append((_grads(model.parameters()).clone(), kwng.last_kernel.bandwidth, kwng.current_eps()))
            opt.step()
        runs[graphs] = seen, kwng
    (on, kwng_on), (off, kwng_off) = runs[True], runs[False]
    for (g_on, ell_on, eps_on), (g_off, ell_off, eps_off) in zip(on, off, strict=True):
        assert torch.equal(g_on, g_off) and ell_on == ell_off and eps_on == eps_off
    assert kwng_off._graphs is None
    captured = [e for e in kwng_on._graphs._graphs.values() if e[0] is not None]
    assert len(captured) == 2  # the batch of 64 and the short one


def test_jacobian_damping_is_exact_for_any_float32_column_without_a_read(monkeypatch):
    """The preconditioner's ``D = 1/(‖T̃_j‖ + floor)`` for float32 ``T̃`` takes its column norms in
    float64, with no read: columns whose squares under- or overflow float32 (tiny, subnormal, huge)
    get the norm of the float64 computation, a zero or non-finite column gets 0 (excluded), as the
    core's scaled path gives them. The bound of ``max |S|`` it gives the factorisation lies within
    a factor ``sqrt(M)`` above it, and is NaN (no scale) where ``T̃`` is not finite."""
    from wngkernels import damping_from_whitened
    from wngkernels.torch._direction import jacobian_damping

    rng = np.random.default_rng(0)
    cols = [rng.normal(size=5), 1e-30 * rng.normal(size=5), np.full(5, 1e-44), 1e30 * rng.normal(size=5),
            np.zeros(5), np.r_[3e38, np.zeros(4)], np.r_[np.nan, np.ones(4)], np.r_[np.inf, np.ones(4)],
            np.r_[1e-40, 0.0, 0.0, 0.0, 2e-45]]
    t = np.stack(cols, axis=1).astype(np.float32)
    reads = []
    with monkeypatch.context() as m:
        _counting_reads(m, reads)
        got, bound = jacobian_damping(torch.from_numpy(t), 1e-8)
        finite = t[:, np.isfinite(t).all(axis=0)]
        d_finite, bound_finite = jacobian_damping(torch.from_numpy(finite), 1e-8)
    assert reads == [] and got.dtype == torch.float32
    assert math.isnan(float(bound))  # NaN or Inf in T̃: no scale (the factorisation then takes τ = 1)
    s_max = np.abs(finite.astype(np.float64) * np.sqrt(d_finite.numpy().astype(np.float64))).max()
    assert s_max * (1 - 1e-6) <= float(bound_finite) <= math.sqrt(5) * s_max * (1 + 1e-6)  # float32 rounding
    n = np.sqrt(np.sum(t.astype(np.float64) ** 2, axis=0))
    want = np.where(np.isfinite(n) & (n > 0), 1.0 / (np.where(n > 0, n, 1.0) + 1e-8), 0.0)
    np.testing.assert_allclose(got.numpy(), want.astype(np.float32), rtol=1e-6, atol=0)
    core = damping_from_whitened(torch.from_numpy(t), floor=1e-8).numpy()
    np.testing.assert_allclose(got.numpy(), core, rtol=1e-6, atol=0)
    assert (got.numpy() == 0).tolist() == [False, False, False, False, True, False, True, True, False]


def test_schedules_are_called_with_the_step_and_stored_as_values():
    model, x = make_model("mlp", torch.float64)
    seen = []
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    kwng = KWNG(model.parameters(), eps=lambda s: seen.append(s) or 1e-3 * 0.5**s,
                clip_norm=lambda s: 1.0 + s,
                lam=lambda s: 0.0, optimizer=opt, adaptive_eps=False, generator=0)
    for _ in range(3):
        out = model(x)
        opt.zero_grad()
        kwng.precondition(out, out.square().mean())
    assert set(seen) == {0, 1, 2}
    sd = kwng.state_dict()
    assert sd["eps"] == 1e-3 * 0.5**3 and sd["hyperparameters"]["clip_norm"] == 4.0
    assert sd["hyperparameters"]["lr"] == 0.3 and sd["ratio"]["prev_lr"] == 0.3

    def walk(v):
        assert not callable(v)
        if isinstance(v, dict):
            for u in v.values():
                walk(u)

    walk(sd)
    bad = KWNG(model.parameters(), eps=lambda s: -1.0)
    out = model(x)
    with pytest.raises(ValueError, match=r"eps\(0\) must be a finite number > 0"):
        bad.precondition(out, out.square().mean())


def test_learning_rate_is_read_from_the_optimizer():
    model, x = make_model("mlp", torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    kwng = KWNG(model.parameters(), optimizer=opt, generator=0)
    for lr in (0.3, 0.01):
        opt.param_groups[0]["lr"] = lr
        out = model(x)
        opt.zero_grad()
        kwng.precondition(out, out.square().mean())
        assert kwng.state_dict()["ratio"]["prev_lr"] == lr


def test_split_form_equals_precondition():
    model, x = make_model("batchnorm", torch.float64)
    y = torch.randn(x.shape[0], dtype=torch.float64)
    model2 = copy.deepcopy(model)
    a, b = KWNG(model.parameters(), generator=4, lr=0.1), KWNG(model2.parameters(), generator=4, lr=0.1)
    for _ in range(3):
        for p in [*model.parameters(), *model2.parameters()]:
            p.grad = None
        out = model(x)
        a.precondition(out, _loss(out, y))
        out2 = model2(x)
        loss2 = _loss(out2, y)
        b.capture(out2, loss2)
        loss2.backward()
        assert b.step()
        # one batched backward against two passes: equal up to the order of float64 sums, except the
        # bias before BatchNorm, whose gradient is zero analytically: there both hold rounding noise
        # (times the damping's gain), far below the direction
        w1, w2 = _grads(model.parameters()), _grads(model2.parameters())
        noise = torch.cat([torch.full((p.numel(),), n == "0.bias") for n, p in model.named_parameters()])
        torch.testing.assert_close(w1[~noise], w2[~noise], rtol=1e-12, atol=1e-15)
        assert max(float(w1[noise].abs().max()), float(w2[noise].abs().max())) < 1e-8 * float(w1.abs().max())


def test_param_groups_and_shared_parameters():
    model, x = make_model("shared", torch.float64)
    groups = [{"params": [model.a.weight, model.a.bias], "lr": 0.1},
              {"params": [model.b.bias, *model.head.parameters()], "lr": 0.01}]
    opt = torch.optim.SGD(groups)
    kwng = KWNG(opt.param_groups, optimizer=opt, generator=0, clip_norm=None)
    out = model(x)
    opt.zero_grad()
    assert kwng.precondition(out, out.square().mean())
    # one joint solve over the groups' parameters in their order; the tied weight counted once,
    # its gradient summing both uses: the core's direction from the dense float64 Jacobian
    params = [p for g in groups for p in g["params"]]
    assert len({id(p) for p in params}) == len(list(model.parameters()))
    samples, jac = dense_jacobian(model, x, params)
    g = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(model(x).square().mean(), params)])
    w_core = kwng_direction(g, samples, kernel=Gaussian(kwng.last_kernel.bandwidth), basis=kwng.last_basis,
                            eps=kwng.current_eps(), damping="jacobian", jacobian=jac)
    assert rel_err(to_np(_grads(params)), to_np(w_core)) < 1e-8


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(num_basis=0), ValueError, "num_basis must be an int >= 1"),
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
        (dict(eps=-1e-3), ValueError, "eps must be a finite number > 0"),
        (dict(lam=-1.0), ValueError, "lam must be a finite number >= 0"),
        (dict(clip_norm=0.0), ValueError, "clip_norm must be a finite number > 0"),
        (dict(damping="fisher"), ValueError, "damping must be 'jacobian' or 'identity'"),
        (dict(refresh_every=0), ValueError, "refresh_every must be an int >= 1"),
        (dict(accumulation_steps=0), ValueError, "accumulation_steps must be an int >= 1"),
        (dict(eps_factor=1.5), ValueError, r"eps_factor must lie in \(0, 1\)"),
        (dict(eps_bounds=(1.0, 0.1)), ValueError, "eps_bounds must be"),
        (dict(window=0), ValueError, "window must be an int >= 1"),
        (dict(kernel="gaussian"), TypeError, "kernel must be a wngkernels Kernel"),
        (dict(cuda_graphs="yes"), TypeError, "cuda_graphs must be a bool"),
        (dict(grad_scaler=object()), ValueError, "grad_scaler needs optimizer="),
        (dict(vjp_mode="fast"), ValueError, "vjp_mode must be"),
        (dict(eps="small"), TypeError, "eps must be a float or a callable"),
    ],
)
def test_construction_errors(kwargs, exc, match):
    model, _ = make_model("mlp")
    with pytest.raises(exc, match=match):
        KWNG(model.parameters(), **kwargs)


def test_params_errors():
    model, _ = make_model("mlp")
    w = model[0].weight
    with pytest.raises(TypeError, match="bare Tensor"):
        KWNG(w)
    with pytest.raises(ValueError, match="params is empty"):
        KWNG([])
    with pytest.raises(ValueError, match="same parameter twice"):
        KWNG([w, model[0].bias, w])
    with pytest.raises(TypeError, match=r"params\[0\] must be a Tensor"):
        KWNG([1.0])


def test_call_errors():
    model, x = make_model("mlp")
    kwng = KWNG(model.parameters())
    out = model(x)
    with pytest.raises(ValueError, match="not attached to the autograd graph"):
        kwng.precondition(out.detach(), out.sum())
    with pytest.raises(ValueError, match="loss must be a scalar"):
        kwng.precondition(out, out)
    with pytest.raises(RuntimeError, match="needs capture"):
        kwng.step()
    kwng.capture(model(x))
    with pytest.raises(RuntimeError, match="without step"):
        kwng.capture(model(x))


def test_repr_and_deepcopy():
    model, x = make_model("mlp")
    kwng = KWNG(model.parameters(), eps=lambda s: 1e-3, generator=0, lr=0.1)
    text = repr(kwng)
    assert text.startswith("KWNG(") and "num_basis=5" in text and "q=" in text
    out = model(x)
    kwng.precondition(out, out.square().mean())
    clone = copy.deepcopy(kwng)
    assert _equal_state(clone.state_dict(), kwng.state_dict())
    assert all(a is not b for a, b in zip(clone._params, kwng._params, strict=True))


def _one_step(kwng, model, x, **kwargs):
    out = model(x)
    kwng.precondition(out, out.square().mean(), **kwargs)
    return kwng.last_basis


def test_default_generator_follows_torch_manual_seed():
    """``generator=None`` draws from torch's default CPU generator, as dropout and shuffling do."""
    model, x = make_model("mlp", torch.float64)
    draws = {}
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        kwng = KWNG(model.parameters(), lr=0.1)
        draws.setdefault(seed, []).append([_one_step(kwng, model, x) for _ in range(3)])
    assert draws[0][0] == draws[0][1]
    assert draws[0][0] != draws[1][0]
    assert kwng.state_dict()["rng"] is None  # torch's own state is the caller's to save


@pytest.mark.parametrize("make", [lambda: torch.Generator().manual_seed(3), lambda: np.random.default_rng(3),
                                  lambda: 3], ids=["torch", "numpy", "int"])
def test_private_generators_are_checkpointed_and_win_over_the_loaders(make):
    model, x = make_model("mlp", torch.float64)
    kwng = KWNG(model.parameters(), lr=0.1, generator=make())
    _one_step(kwng, model, x)
    state = kwng.state_dict()
    want = [_one_step(kwng, model, x) for _ in range(3)]
    for other in (None, 7, torch.Generator().manual_seed(9)):  # the checkpoint says where draws come from
        fresh = KWNG(model.parameters(), lr=0.1, generator=other)
        fresh.load_state_dict(state)
        assert [_one_step(fresh, model, x) for _ in range(3)] == want


def test_a_given_basis_is_used_and_forces_a_refresh(monkeypatch):
    model, x = make_model("mlp", torch.float64)
    params = list(model.parameters())
    calls = []
    real = capture.batched_vjp
    monkeypatch.setattr(capture, "batched_vjp", lambda *a, **k: calls.append(1) or real(*a, **k))
    kwng = KWNG(params, refresh_every=100, clip_norm=None, adaptive_eps=False, eps=1e-3, generator=0)
    _one_step(kwng, model, x)
    basis = NystromBasis(np.array([0, 3, 5, 7]), np.array([2, 0, 1, 2]))
    for p in params:
        p.grad = None
    assert _one_step(kwng, model, x, basis=basis) is basis
    assert len(calls) == 2  # refreshed although refresh_every=100
    w = _grads(params)
    g = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(model(x).square().mean(), params)])
    samples, jac = dense_jacobian(model, x, params)
    want = kwng_direction(g, samples, kernel=Gaussian(kwng.last_kernel.bandwidth), basis=basis, eps=1e-3,
                          damping="jacobian", jacobian=jac)
    assert rel_err(to_np(w), to_np(want)) < 1e-10


def test_basis_errors():
    model, x = make_model("mlp", torch.float64)
    kwng = KWNG(model.parameters(), lr=0.1, accumulation_steps=2)
    with pytest.raises(TypeError, match="basis must be a NystromBasis; got list"):
        kwng.capture(model(x), basis=[0, 1])
    with pytest.raises(ValueError, match="indices"):
        kwng.capture(model(x), basis=NystromBasis(np.array([0, 99]), np.array([0, 0])))
    kwng.capture(model(x), basis=NystromBasis(np.array([0, 1]), np.array([0, 0])))
    with pytest.raises(ValueError, match="basis can only be given at the first micro-batch"):
        kwng.capture(model(x), basis=NystromBasis(np.array([0, 1]), np.array([0, 0])))
    with pytest.raises(TypeError, match="generator must be None, an int seed"):
        KWNG(model.parameters(), generator="seed")


def test_an_exception_in_capture_discards_the_step_and_leaves_the_instance_usable():
    model, x = make_model("mlp", torch.float64)
    params = list(model.parameters())
    kwng = KWNG(params, accumulation_steps=2, generator=0, lr=0.1)
    state = kwng.state_dict()
    kwng.capture(model(x))
    with pytest.raises(ValueError, match="features per sample in every micro-batch"):
        kwng.capture(torch.cat([model(x), model(x)], dim=1))  # d changed between micro-batches
    assert kwng._pending is None and kwng.state_dict()["rng"] == state["rng"]  # rewound
    with pytest.raises(RuntimeError, match=r"step\(\) needs capture"):
        kwng.step()
    for p in params:
        p.grad = None
    for _ in range(2):  # a fresh step from the start
        out = model(x)
        kwng.capture(out, out.square().mean() / 2)
        (out.square().mean() / 2).backward()
    assert kwng.step() and kwng.num_fallbacks == 0


def test_a_short_last_batch_uses_every_pair_and_is_counted():
    """Regression (d = 1) with a last batch of 3 samples and M = 5: the basis takes the 3 pairs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    params = list(model.parameters())
    kwng = KWNG(params, num_basis=5, eps=1e-3, clip_norm=None, adaptive_eps=False, lr=0.1, generator=0)
    x, y = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    out = model(x)
    assert kwng.precondition(out, ((out - y) ** 2).mean())
    assert kwng.last_basis.num_basis == 3 and kwng.num_short_batches == 1 and kwng.num_fallbacks == 0
    w = _grads(params)
    g = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(((model(x) - y) ** 2).mean(), params)])
    samples, jac = dense_jacobian(model, x, params)
    want = kwng_direction(g, samples, kernel=Gaussian(kwng.last_kernel.bandwidth), basis=kwng.last_basis,
                          eps=1e-3, damping="jacobian", jacobian=jac)
    assert rel_err(to_np(w), to_np(want)) < 1e-10
    assert kwng.state_dict()["num_short_batches"] == 1


@pytest.mark.parametrize("kernel", [Gaussian(AuthorsRule()), Gaussian(0.7),
                                    RationalQuadratic(AuthorsRule(), alpha=2.0)],
                         ids=["authors-rule", "fixed", "rational-quadratic"])
def test_the_draws_device_work_is_the_cores(kernel):
    """``first_rows`` — the device work of a single process's draw, which a CUDA graph captures —
    gives the basis points, their one-hot, the rule's bandwidth (the host rule's value), the core's
    ``cross_hessian_rows`` and their ``C Cᵀ``; the draw hands its rows and ``C Cᵀ`` on."""
    from wngkernels.torch._graphs import first_rows
    from wngkernels.torch._state import _Pending

    torch.manual_seed(0)
    xd = torch.randn(32, 5, dtype=torch.float64)
    basis = NystromBasis(np.array([3, 7, 11, 20, 31]), np.array([0, 4, 2, 2, 1]))
    pairs = torch.from_numpy(np.concatenate([basis.indices, basis.dims]))
    points, onehot, ell, rows, cc = first_rows(kernel, xd, pairs)
    idx, dims = basis.indices.tolist(), basis.dims.tolist()
    assert torch.equal(points, xd[idx]) and torch.equal(onehot, torch.eye(5, dtype=torch.float64)[dims])
    rule = kernel.bandwidth
    assert (ell is None) == (not callable(rule))
    value = kernel.bandwidth if ell is None else float(ell)
    assert ell is None or value == rule(xd[idx], xd)  # the host rule, bit for bit
    want = kernel.with_bandwidth(value).cross_hessian_rows(xd[idx], dims, xd)
    np.testing.assert_allclose(to_np(rows), to_np(want), rtol=1e-12, atol=1e-14)
    flat = to_np(want).reshape(5, -1)
    np.testing.assert_allclose(to_np(cc), flat @ flat.T, rtol=1e-12, atol=1e-14 * np.abs(flat).max() ** 2)
    kwng = KWNG([torch.nn.Parameter(torch.zeros(3))], kernel=kernel, generator=0)
    pend = _Pending(rng_state=None, refresh=True, active=(0,))
    drawn = kwng._draw(pend, xd, basis)
    assert torch.equal(drawn, rows) and torch.equal(pend.cc, cc) and torch.equal(pend.dims, pairs[5:])

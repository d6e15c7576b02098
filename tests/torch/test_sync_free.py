"""``KWNG(sync_free=True)``: the core's direction with nothing read back, the host's ε rule on the
device, a non-finite ``g`` written as zeros, checkpoints, and the options it refuses."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from wngkernels import AuthorsRule, Gaussian, MedianHeuristic, kwng_direction  # noqa: E402
from wngkernels.torch import KWNG  # noqa: E402
from wngkernels.torch._syncfree import cholesky_inverse, whitening_factor  # noqa: E402

from .helpers import DEVICES, dense_jacobian, make_model, rel_err, to_np  # noqa: E402
from .test_preconditioner import _counting_reads, _grads, _loss  # noqa: E402


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("damping", ["jacobian", "identity"])
def test_the_direction_is_the_cores(damping, dtype, device):
    """One step's direction against the core's dense float64-style computation, same basis and bandwidth:
    the Cholesky jitter (``M·eps`` relative) changes nothing beyond the dtype's rounding."""
    model, x = make_model("mlp", dtype, device)
    params = list(model.parameters())
    y = torch.randn(x.shape[0], dtype=dtype, device=device)
    kwng = KWNG(params, num_basis=7, eps=1e-3, clip_norm=None, generator=3, lr=0.1, damping=damping,
                sync_free=True)
    out = model(x)
    assert kwng.precondition(out, _loss(out, y))
    w = _grads(params)
    g = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(_loss(model(x), y), params)])
    samples, jac = dense_jacobian(model, x, params)
    w_core = kwng_direction(g.double(), samples.double(), kernel=Gaussian(kwng.last_kernel.bandwidth),
                            basis=kwng.last_basis, eps=1e-3, damping=damping, jacobian=jac.double())
    assert w.dtype == dtype and w.device.type == device
    assert rel_err(to_np(w), to_np(w_core)) < (1e-9 if dtype == torch.float64 else 2e-3)


def _ill_conditioned(dtype, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)
    with torch.no_grad():
        model[2].weight.mul_(torch.logspace(-4, 1, 4, dtype=dtype)[:, None])
    return model


def _train(sync_free: bool, dtype, steps: int, split: bool = False, **options):
    """Directions, ε after each step and the counters of a short run (SGD with momentum, cross-entropy)."""
    model = _ill_conditioned(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kwng = KWNG(model.parameters(), optimizer=opt, generator=1, window=3, sync_free=sync_free, **options)
    gen = torch.Generator().manual_seed(2)
    dirs, eps = [], []
    for _ in range(steps):
        x, y = torch.randn(32, 6, generator=gen, dtype=dtype), torch.randint(0, 4, (32,), generator=gen)
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        if split:
            kwng.capture(out, loss)
            loss.backward()
            assert kwng.step()
        else:
            assert kwng.precondition(out, loss)
        dirs.append(_grads(model.parameters()).clone())
        opt.step()
        eps.append(kwng.current_eps())
    return dirs, eps, kwng


@pytest.mark.parametrize("refresh_every", [1, 4])
@pytest.mark.parametrize("split", [False, True], ids=["precondition", "capture-backward-step"])
def test_a_run_follows_the_default_steps_and_eps(split, refresh_every):
    """Step after step (float64), the directions, the reduction-ratio rule's ``ε`` and the counters are
    the default step's: the rule run on the device is the host's."""
    d0, e0, k0 = _train(False, torch.float64, 16, split, refresh_every=refresh_every)
    d1, e1, k1 = _train(True, torch.float64, 16, split, refresh_every=refresh_every)
    assert len(set(e0)) > 2, "the test needs ε to move"
    np.testing.assert_allclose(e1, e0, rtol=1e-12)
    assert max(rel_err(to_np(a), to_np(b)) for a, b in zip(d1, d0, strict=True)) < 1e-8
    def counts(k):
        return k.num_fallbacks, k.num_skipped, k.step_count
    assert counts(k1) == counts(k0)
    s0, s1 = k0.state_dict(), k1.state_dict()
    assert s1["ratio"]["count"] == s0["ratio"]["count"]
    keys = ("prev_loss", "prev_gw", "prev_lr", "r_max")
    np.testing.assert_allclose([s1["ratio"][k] for k in keys], [s0["ratio"][k] for k in keys], rtol=1e-9)


def test_float32_follows_the_default_steps():
    d0, e0, _ = _train(False, torch.float32, 12)
    d1, e1, _ = _train(True, torch.float32, 12)
    assert e1 == e0
    assert max(rel_err(to_np(a), to_np(b)) for a, b in zip(d1, d0, strict=True)) < 5e-3


@pytest.mark.parametrize("refresh_every", [1, 3])
def test_nothing_is_read_back(monkeypatch, refresh_every):
    """Capture, batched backward and step, at refreshes and between them and where windows of the ratio
    rule close, without one read of a tensor's value (``tolist``, ``item``, ``float``, ``bool``, ``int``);
    reading ``current_eps`` afterwards reads once."""
    model = _ill_conditioned(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kwng = KWNG(model.parameters(), optimizer=opt, generator=0, window=2, refresh_every=refresh_every,
                sync_free=True)
    reads = []
    with monkeypatch.context() as m:
        _counting_reads(m, reads)
        for _ in range(7):
            x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
            out = model(x)
            opt.zero_grad()
            assert kwng.precondition(out, torch.nn.functional.cross_entropy(out, y))
            opt.step()
        assert reads == []
        kwng.current_eps()
        assert kwng.num_fallbacks == 0
        assert reads == ["tolist"]


def test_a_non_finite_gradient_writes_zeros_and_counts():
    """``g`` with a NaN: zeros written (no parameter receives a NaN), ``num_skipped`` counts it, the
    ratio rule and ε are left as they were; the next step is a normal one."""
    model = _ill_conditioned(torch.float64)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    kwng = KWNG(params, optimizer=opt, generator=0, sync_free=True)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    for bad in (False, True, False):
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        kwng.capture(out, loss)
        loss.backward()
        if bad:
            params[0].grad[0, 0] = math.nan
            before = kwng.state_dict()
        assert kwng.step()
        if bad:
            assert all(torch.count_nonzero(p.grad) == 0 for p in params)
            after = kwng.state_dict()
            assert after["ratio"] == before["ratio"] and after["eps"] == before["eps"]
        opt.step()
        assert all(bool(torch.isfinite(p).all()) for p in params)
    assert (kwng.num_skipped, kwng.num_fallbacks, kwng.step_count) == (1, 0, 3)


def test_non_finite_outputs_fall_back_to_the_gradient():
    """Outputs with a NaN give a NaN ``C Cᵀ`` and ``T̃``: the step writes ``g`` and counts a fallback."""
    model = _ill_conditioned(torch.float64)
    params = list(model.parameters())
    kwng = KWNG(params, lr=0.1, generator=0, clip_norm=None, sync_free=True)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    kwng.capture(torch.where(torch.arange(16)[:, None] == 3, math.nan, out), loss)
    loss.backward()
    g = _grads(params).clone()
    assert kwng.step()
    assert torch.equal(_grads(params), g)
    assert kwng.num_fallbacks == 1


def test_a_checkpoint_resumes_bit_for_bit():
    """``state_dict`` mid-run (reading the device state) and ``load_state_dict`` into a fresh instance:
    both continue with the same directions and ε."""
    model = _ill_conditioned(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kwng = KWNG(model.parameters(), optimizer=opt, generator=1, window=2, refresh_every=2, sync_free=True)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 6, generator=gen, dtype=torch.float64),
                torch.randint(0, 4, (16,), generator=gen)) for _ in range(10)]

    def run(k, m, o, part):
        out = []
        for x, y in part:
            f = m(x)
            o.zero_grad()
            k.precondition(f, torch.nn.functional.cross_entropy(f, y))
            out.append(_grads(m.parameters()).clone())
            o.step()
        return out

    run(kwng, model, opt, batches[:5])
    state, model2 = kwng.state_dict(), copy.deepcopy(model)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    opt2.load_state_dict(opt.state_dict())
    other = KWNG(model2.parameters(), optimizer=opt2, generator=7, window=2, refresh_every=2, sync_free=True)
    other.load_state_dict(state)
    a, b = run(kwng, model, opt, batches[5:]), run(other, model2, opt2, batches[5:])
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert kwng.current_eps() == other.current_eps()


def test_a_half_precision_grad_takes_g_where_w_does_not_fit():
    """float16 parameters, a direction beyond 65504 (tiny ε, no clipping): ``g`` is written, decided on the
    device, and counted, as by the default step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).half()
    x = torch.randn(16, 4).half()
    for sync_free in (False, True):
        kwng = KWNG(model.parameters(), lr=0.1, eps=1e-10, clip_norm=None, generator=0, adaptive_eps=False,
                    sync_free=sync_free)
        model.zero_grad()
        out = model(x)
        kwng.precondition(out, (out.float() ** 2).mean() * 1e3)
        assert all(p.grad.dtype == torch.float16 for p in model.parameters())
        assert bool(torch.isfinite(_grads(model.parameters())).all())
        assert kwng.num_fallbacks == 1


@pytest.mark.parametrize("options, match", [
    ({"sync_free": 1}, "sync_free must be a bool"),
    ({"lam": 1e-3}, "lam = 0.001 > 0"),
    ({"kernel": Gaussian(MedianHeuristic())}, "bandwidth rule"),
], ids=["not-a-bool", "lam", "median-rule"])
def test_options_that_need_a_read_are_refused(options, match):
    model = torch.nn.Linear(3, 2)
    opts = {"sync_free": True, **options}
    with pytest.raises(TypeError if match.startswith("sync_free must") else ValueError, match=match):
        KWNG(model.parameters(), **opts)


def test_a_grad_scaler_is_refused():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="grad_scaler"):
        KWNG(model.parameters(), optimizer=opt, grad_scaler=scaler, sync_free=True)


def test_a_lam_schedule_that_leaves_zero_is_refused_at_its_step():
    model = _ill_conditioned(torch.float64)
    kwng = KWNG(model.parameters(), lr=0.1, lam=lambda step: 0.0 if step == 0 else 1e-3, generator=0,
                sync_free=True)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    for step in range(2):
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        if step == 0:
            assert kwng.precondition(out, loss)
        else:
            with pytest.raises(ValueError, match="lam = 0"):
                kwng.precondition(out, loss)


def test_the_whitening_factor_is_the_inverse_square_root():
    """``Fᵀ F = (C Cᵀ + cδI)⁻¹`` in float64 for a random Gram matrix of any scale; a rank-deficient one
    still factorises (the second jitter where the first fails) and a NaN one gives NaN."""
    rng = np.random.default_rng(0)
    for scale in (1e-30, 1.0, 1e30):
        a = rng.standard_normal((5, 40))
        cc = torch.as_tensor(a @ a.T * scale)
        f = whitening_factor(cc, torch.float64)
        np.testing.assert_allclose(to_np(f.T @ f @ cc), np.eye(5), atol=1e-9)
    low = torch.as_tensor(np.outer(np.arange(1.0, 6.0), np.arange(1.0, 6.0)))  # rank 1
    inv = cholesky_inverse(low / 25.0, (0.0, 1e-6))
    assert bool(torch.isfinite(inv).all())
    np.testing.assert_allclose(to_np(inv @ (low / 25.0 + 1e-6 * torch.eye(5)) @ inv.T), np.eye(5), atol=1e-8)
    assert not bool(torch.isfinite(whitening_factor(torch.full((3, 3), math.nan), torch.float32)).any())


def test_repr_names_the_mode():
    kwng = KWNG(torch.nn.Linear(2, 2).parameters(), sync_free=True)
    assert "sync_free=True" in repr(kwng)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("refresh_every", [1, 10])
def test_a_cuda_step_never_synchronises(refresh_every):
    """CUDA's own count of synchronising calls (``set_sync_debug_mode``) in sync_free steps, with the
    ratio rule on and a window closing: none."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from step_reads import count_syncs

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwng = KWNG(model.parameters(), optimizer=opt, refresh_every=refresh_every, window=2, generator=0,
                sync_free=True)
    x, y = torch.randn(64, 6, device=dev), torch.randint(0, 4, (64,), device=dev)

    def step():
        opt.zero_grad()
        out = model(x)
        assert kwng.precondition(out, torch.nn.functional.cross_entropy(out, y))
        opt.step()

    step()
    assert [count_syncs(step) for _ in range(3)] == [0, 0, 0]  # CUDA's debug mode, warned step by step
    assert kwng.num_fallbacks == 0 and math.isfinite(kwng.current_eps())


def test_the_authors_rule_is_accepted():
    assert KWNG(torch.nn.Linear(2, 2).parameters(), kernel=Gaussian(AuthorsRule()), sync_free=True).sync_free


def test_the_device_ratio_rule_is_the_hosts():
    """:class:`DeviceState` against the host's :class:`_Ratio` and ``KWNG._adapt`` over random steps:
    ratios around both thresholds, missing losses and learning rates, non-positive ``⟨g, w⟩`` and
    skipped steps; ε's factor and the memory agree after every step."""
    from wngkernels.torch._state import _Ratio
    from wngkernels.torch._syncfree import DeviceState

    rng = np.random.default_rng(0)
    base, factor, bounds, window = 1e-3, 0.85, (1e-6, 1e-1), 3
    host, scale = _Ratio(), 1.0
    dev = DeviceState(host, scale, torch.device("cpu"))
    loss, moves = 1.0, 0
    for _ in range(300):
        gw = float(rng.choice([-0.1, 0.0, 1.0, 2.0]))
        lr = None if rng.random() < 0.05 else 0.5
        ok = rng.random() > 0.1
        # a drop of r · lr · gw_prev / 2 gives the ratio r: spread around 0.25 and 0.75
        drop = float(rng.uniform(-0.2, 1.2)) * (host.prev_lr or 0.5) * max(host.prev_gw or 1.0, 0.1) / 2
        loss_now = loss - drop
        g_ok = torch.tensor(ok)
        eps_before = min(max(base * scale, bounds[0]), bounds[1])
        if ok:  # the host skips a non-finite step before its rule
            r_max = host.observe(loss_now, window)
            if r_max is not None:
                new = _Ratio.moved(eps_before, r_max, factor, bounds)
                moves += new != eps_before
                scale = new / base
            host.record(loss_now, gw, lr)
            loss = loss_now
        dev.observe(torch.tensor(loss_now, dtype=torch.float64), g_ok, base, factor, bounds, window)
        dev.record(torch.tensor(loss_now, dtype=torch.float64), torch.tensor(gw, dtype=torch.float64), lr,
                   g_ok, torch.tensor(0.0))
        got, got_scale, _, _ = dev.read()
        assert got.count == host.count and got.prev_lr == host.prev_lr
        assert got.prev_loss == pytest.approx(host.prev_loss) and got.prev_gw == pytest.approx(host.prev_gw)
        assert got.r_max == pytest.approx(host.r_max) and got_scale == pytest.approx(scale, rel=1e-12)
    assert moves > 20


def test_the_unseen_rule_is_dropped_once_the_device_says_nothing_is_excluded():
    """:meth:`CholeskySolver.settled`: unchanged while the flag's copy is in flight; then without the
    rule where no parameter is excluded, with it where one is. The direction is the same either way."""
    from dataclasses import replace

    from wngkernels.torch._syncfree import factorize

    class Done:
        def __init__(self, done):
            self.done = done

        def query(self):
            return self.done

    rng = np.random.default_rng(0)
    tw = torch.as_tensor(rng.standard_normal((3, 20)))
    g = torch.as_tensor(rng.standard_normal(20))
    for zero in (False, True):
        dmp = torch.as_tensor(rng.uniform(0.5, 2.0, 20))
        if zero:
            dmp[4] = 0.0
        solver = factorize(tw, dmp)
        waiting = replace(solver, pending=(torch.tensor(zero), Done(False)))
        assert waiting.settled() is waiting
        settled = replace(solver, pending=(torch.tensor(zero), Done(True))).settled()
        assert settled.pending is None and (settled.excluded is not None) == zero
        xp = __import__("array_api_compat").array_namespace(g)
        np.testing.assert_allclose(to_np(settled._solve(xp, g, 1e-3, False)),
                                   to_np(solver._solve(xp, g, 1e-3, False)), rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("unseen", [False, True], ids=["all-seen", "a-loss-weight-unseen"])
def test_cuda_steps_between_refreshes_settle_the_unseen_rule(unseen):
    """On CUDA the factorisation's exclusion flag arrives without a wait; the steps after it use the
    rule only where a parameter is excluded (a weight that only the loss sees), with the default's
    directions."""
    dev = torch.device("cuda")
    runs = []
    for sync_free in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dev)
        weight = torch.nn.Parameter(torch.ones((), device=dev))
        params = [*model.parameters(), *([weight] if unseen else [])]
        kwng = KWNG(params, lr=0.1, refresh_every=100, generator=0, adaptive_eps=False, sync_free=sync_free)
        gen = torch.Generator().manual_seed(1)
        dirs = []
        for _ in range(3):
            x = torch.randn(32, 6, generator=gen).to(dev)
            y = torch.randint(0, 4, (32,), generator=gen).to(dev)
            for p in params:
                p.grad = None
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out, y) * (weight if unseen else 1.0)
            kwng.precondition(out, loss)
            torch.cuda.synchronize()
            dirs.append(_grads(params).clone())
        runs.append(dirs)
        if sync_free:
            assert kwng._cache.solver.pending is None
            assert (kwng._cache.solver.excluded is not None) == unseen
    for a, b in zip(*runs, strict=True):
        assert rel_err(to_np(b), to_np(a)) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graphs_replay_the_eager_steps_between_refreshes():
    """``cuda_graphs=True`` replays the tail of the steps that reuse a cached solver from a graph
    (captured anew after each refresh), with the eager numbers: directions and ε step for step, through
    windows that move ε, a learning-rate change and a read of the device state mid-run."""
    dev = torch.device("cuda")
    runs, kwngs = [], []
    for graphs in (False, True):
        model = _ill_conditioned(torch.float32).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        kwng = KWNG(model.parameters(), optimizer=opt, generator=1, window=2, refresh_every=4,
                    cuda_graphs=graphs, sync_free=True)
        gen = torch.Generator().manual_seed(2)
        dirs, eps = [], []
        for step in range(14):
            x = torch.randn(32, 6, generator=gen).to(dev)
            y = torch.randint(0, 4, (32,), generator=gen).to(dev)
            if step == 7:
                opt.param_groups[0]["lr"] = 0.02
            out = model(x)
            opt.zero_grad()
            assert kwng.precondition(out, torch.nn.functional.cross_entropy(out, y))
            dirs.append(_grads(model.parameters()).clone())
            opt.step()
            if step in (5, 10):
                eps.append(kwng.current_eps())
        eps.append(kwng.current_eps())
        runs.append((dirs, eps, kwng.num_fallbacks))
        kwngs.append(kwng)
    assert any(e.graph is not None for e in kwngs[1]._tails._entries.values()), "no graph was captured"
    (d0, e0, f0), (d1, e1, f1) = runs
    assert len(set(e0)) > 1 and f0 == f1
    np.testing.assert_allclose(e1, e0, rtol=1e-12)
    for a, b in zip(d0, d1, strict=True):
        assert rel_err(to_np(b), to_np(a)) < 1e-6


@pytest.mark.parametrize("rel", [1e-3, 1e-5, 1e-7, 0.0])
def test_nearly_dependent_rows_keep_the_direction_accurate(rel):
    """float32 ``T̃`` with two rows equal up to ``rel`` (``S`` nearly or exactly rank-deficient): the
    Cholesky passes' direction is within float32's reach of the float64 one, as the default's is."""
    from array_api_compat import array_namespace

    from wngkernels import solve_whitened
    from wngkernels.torch._syncfree import factorize

    rng = np.random.default_rng(0)
    q, m = 20000, 5
    scale = np.logspace(0, -3, q)[None, :]
    base = rng.standard_normal((m, q)) * scale
    base[4] = base[3] + rel * rng.standard_normal(q) * scale[0]
    tw64 = torch.as_tensor(base)
    dmp = 1.0 / (tw64.norm(dim=0) + 1e-8)
    # a gradient mostly in the rows' span, where an inexact basis would show most
    g = torch.as_tensor(rng.standard_normal(q)) * 1e-3 + tw64.T @ torch.as_tensor(rng.standard_normal(m)) * 10
    truth = solve_whitened(tw64, g, eps=1e-5, damping=dmp)
    tw, g32 = tw64.float(), g.float()
    default = solve_whitened(tw, g32, eps=1e-5, damping=dmp.float())
    free = factorize(tw, dmp.float())._solve(array_namespace(g32), g32, 1e-5, False)
    assert rel_err(to_np(free), to_np(truth)) < max(1e-3, 3 * rel_err(to_np(default), to_np(truth)))

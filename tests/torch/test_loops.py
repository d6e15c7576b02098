"""KWNG in real training loops: accumulation, AMP and the grad scaler, torch.compile, digits."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from wngkernels import Gaussian, kwng_direction  # noqa: E402
from wngkernels.torch import KWNG  # noqa: E402

from .helpers import DEVICES, dense_jacobian, make_model, rel_err, to_np  # noqa: E402


def _mse(out, y):
    return ((out - y[:, None]) ** 2).mean()


def _grads(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [True, False], ids=["split", "precondition"])
def test_accumulation_equals_the_concatenated_batch(split, device):
    model, _ = make_model("mlp", torch.float64, device)
    params = list(model.parameters())
    torch.manual_seed(3)
    x = torch.randn(24, 4, dtype=torch.float64, device=device)
    y = torch.randn(24, dtype=torch.float64, device=device)
    k = 3
    kwng = KWNG(params, num_basis=6, eps=1e-3, clip_norm=None, accumulation_steps=k, generator=2, lr=0.1)
    written = []
    for xi, yi in zip(x.chunk(k), y.chunk(k), strict=True):
        out = model(xi)
        loss = _mse(out, yi) / k  # the usual scaling: .grad sums to the concatenated batch's gradient
        if split:
            kwng.capture(out, loss)
            loss.backward()
            written.append(kwng.step())
        else:
            written.append(kwng.precondition(out, loss))
    assert written == [False, False, True]
    g = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(_mse(model(x), y), params)])
    samples, jac = dense_jacobian(model, x, params)
    # basis points from the first micro-batch are samples of the concatenated batch too
    w_core = kwng_direction(g, samples, kernel=Gaussian(kwng.last_kernel.bandwidth), basis=kwng.last_basis,
                            eps=1e-3, damping="jacobian", jacobian=jac)
    assert rel_err(to_np(_grads(params)), to_np(w_core)) < 1e-11


def test_grad_scaler_gives_the_unscaled_direction():
    model, x = make_model("mlp", torch.float32)
    y = torch.randn(x.shape[0])
    model2 = copy.deepcopy(model)
    opt, opt2 = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model2.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    a = KWNG(model.parameters(), optimizer=opt, grad_scaler=scaler, generator=1)
    b = KWNG(model2.parameters(), optimizer=opt2, generator=1)
    # a scaler keeps T's whitening after the backward; b does the same, so that the two directions
    # differ by the scaling alone (whitening the cotangents instead rounds differently in float32:
    # test_preconditioner.py compares the two orders)
    b._whitens_cotangents = lambda outputs: False
    for _ in range(3):
        out, out2 = model(x), model2(x)
        opt.zero_grad()
        opt2.zero_grad()
        assert a.precondition(out, _mse(out, y))
        assert b.precondition(out2, _mse(out2, y))
        np.testing.assert_allclose(to_np(_grads(model.parameters())), to_np(_grads(model2.parameters())),
                                   rtol=1e-5, atol=1e-7)
        scaler.step(opt)
        scaler.update()
        opt2.step()


def test_a_step_the_scaler_skips_changes_no_state():
    model, x = make_model("mlp", torch.float32)
    y = torch.randn(x.shape[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    kwng = KWNG(model.parameters(), optimizer=opt, grad_scaler=scaler, generator=1)
    out = model(x)
    opt.zero_grad()
    kwng.precondition(out, _mse(out, y))
    scaler.step(opt)
    scaler.update()
    before_state = kwng.state_dict()
    before = [p.detach().clone() for p in model.parameters()]
    out = model(x)
    opt.zero_grad()
    loss = _mse(out, y) + (model[0].bias * math.inf).sum()  # an overflow in the backward
    assert not kwng.precondition(out, loss)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**12
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    after = kwng.state_dict()
    assert after.pop("num_skipped") == before_state.pop("num_skipped") + 1
    assert after.keys() == before_state.keys()
    assert all(_same(after[k], before_state[k]) for k in after)


def _same(a, b):
    if isinstance(a, dict):
        return all(_same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("device", DEVICES)
def test_amp_run_with_injected_overflows_ends_finite(device):
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    kwng = KWNG(model.parameters(), optimizer=opt, grad_scaler=scaler, generator=0)
    x, y = torch.randn(64, 8, device=device), torch.randint(0, 4, (64,), device=device)
    injected, losses = {7, 23, 31}, []
    for step in range(40):  # 3 of 40 steps (7.5 %) get an Inf in the backward
        with torch.autocast(device, dtype=dtype):
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out, y)
        if step in injected:
            loss = loss + (model[0].bias.float() * math.inf).sum()
        opt.zero_grad()
        kwng.precondition(out, loss)
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
        assert kwng.state_dict()["cache"]["t_white"].dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert kwng.num_skipped == len(injected)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def _compiled_run(backend: str, split: bool, device="cpu"):
    """Three KWNG steps on a ``torch.compile``-d MLP next to the same steps in eager mode."""
    model, x = make_model("mlp", torch.float32, device)
    y = torch.randn(x.shape[0], device=device)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)
    a = KWNG(model.parameters(), lr=0.1, generator=0)
    b = KWNG(eager.parameters(), lr=0.1, generator=0)
    for _ in range(3):
        for p in [*model.parameters(), *eager.parameters()]:
            p.grad = None
        out = compiled(x)
        loss = _mse(out, y)
        if split:
            a.capture(out, loss)
            loss.backward()
            a.step()
        else:
            a.precondition(out, loss)
        out2 = eager(x)
        b.precondition(out2, _mse(out2, y))
        np.testing.assert_allclose(to_np(_grads(model.parameters())), to_np(_grads(eager.parameters())),
                                   rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            for p, q in zip(model.parameters(), eager.parameters(), strict=True):
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad
    assert a.num_fallbacks == 0


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [False, True], ids=["precondition", "split"])
@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_model_trains_and_matches_eager(backend, split, device):
    """``torch.compile``'s default backend donates saved buffers to its backward, which forbids the
    repeated backward that ``T`` needs through compiled code: with that one setting off, the
    compiled model gives the eager model's directions."""
    torch._dynamo.reset()
    with torch._functorch.config.patch(donated_buffer=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "wngkernels: the batched backward", UserWarning)
        _compiled_run(backend, split, device)


def test_donated_buffers_error_names_the_setting(monkeypatch):
    """A graph compiled with donated buffers refuses the retained backward that ``T`` needs (seen with
    inductor on a ResNet; whether a graph donates depends on the graph and on compile caches, so the
    refusal is injected here): KWNG's error names the setting to change."""
    import wngkernels.torch._batched as batched

    real = torch.autograd.grad

    def refuse(*args, **kwargs):  # the passes through the model (with cotangents) are refused
        if "grad_outputs" not in kwargs:
            return real(*args, **kwargs)
        raise RuntimeError("This backward function was compiled with non-empty donated buffers which "
                           "requires create_graph=False and retain_graph=False.")

    monkeypatch.setattr(batched.torch.autograd, "grad", refuse)
    model, x = make_model("mlp", torch.float64)
    kwng = KWNG(model.parameters(), lr=0.1)
    out = model(x)
    with pytest.raises(RuntimeError, match=r"torch\._functorch\.config\.donated_buffer = False"):
        kwng.precondition(out, out.square().mean())
    monkeypatch.undo()
    assert kwng.precondition(model(x), model(x).square().mean())  # usable afterwards


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_autocast_without_a_scaler_trains_in_float32(device):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kwng = KWNG(model.parameters(), optimizer=opt, generator=0)
    x, y = torch.randn(64, 8, device=device), torch.randint(0, 4, (64,), device=device)

    def full_loss():
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y))

    start = full_loss()
    for _ in range(30):
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out, y)
        assert out.dtype == torch.bfloat16
        opt.zero_grad()
        kwng.precondition(out, loss)
        opt.step()
    assert kwng._cache.t_white.dtype == torch.float32  # T, C Cᵀ and the solve in float32
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert full_loss() < start

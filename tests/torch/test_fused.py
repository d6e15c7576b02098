"""One backward for ``T`` and ``g`` in ``precondition``: when it is taken, and that ``.grad`` is what
``loss.backward()`` would have accumulated."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from wngkernels.torch import KWNG  # noqa: E402
from wngkernels.torch._batched import grad_only_through  # noqa: E402

from .helpers import make_model, to_np  # noqa: E402


def _mse(out, y):
    return ((out - y[:, None]) ** 2).mean()


def _backward_visits(model):
    """Count how often the backward of the first layer's output is evaluated (a graph hook)."""
    count = [0]

    def forward_hook(module, inputs, output):
        output.grad_fn.register_prehook(lambda grads: count.__setitem__(0, count[0] + 1))

    model[0].register_forward_hook(forward_hook)
    return count


def _pair(dtype=torch.float64):
    model, x = make_model("mlp", dtype)
    return model, copy.deepcopy(model), x, torch.randn(x.shape[0], dtype=dtype)


def test_precondition_takes_one_backward_and_split_form_two():
    model, twin, x, y = _pair()
    visits, twin_visits = _backward_visits(model), _backward_visits(twin)
    a = KWNG(model.parameters(), generator=0, lr=0.1)
    b = KWNG(twin.parameters(), generator=0, lr=0.1)
    out = model(x)
    a.precondition(out, _mse(out, y))
    out = twin(x)
    loss = _mse(out, y)
    b.capture(out, loss)
    loss.backward()
    b.step()
    assert visits[0] == 1 and twin_visits[0] == 2
    np.testing.assert_allclose(to_np(torch.cat([p.grad.reshape(-1) for p in model.parameters()])),
                               to_np(torch.cat([p.grad.reshape(-1) for p in twin.parameters()])), rtol=1e-12)


def _grad_after(fused: bool, model, x, y, loss_fn, **options):
    """``.grad`` just before ``step()`` rewrites it: the loss's gradient, fused or not."""
    params = list(model.parameters())
    kwng = KWNG(params, generator=0, lr=0.1, **options)
    kwng.step = lambda: True  # stop before the direction replaces g
    out = model(x)
    loss = loss_fn(model, out, y)
    if fused:
        kwng.precondition(out, loss)
    else:
        kwng.capture(out, loss)
        (kwng.grad_scaler.scale(loss) if kwng.grad_scaler is not None else loss).backward()
    return [None if p.grad is None else p.grad.clone() for p in params]


def _plain(model, out, y):
    return _mse(out, y)


def _weight_decay(model, out, y):
    return _mse(out, y) + 1e-2 * sum(p.square().sum() for p in model.parameters())


@pytest.mark.parametrize("loss_fn", [_plain, _weight_decay], ids=["loss-through-outputs", "weight-decay"])
@pytest.mark.parametrize("existing", [False, True], ids=["grad-none", "grad-accumulates"])
def test_grad_equals_what_backward_accumulates(loss_fn, existing):
    model, twin, x, y = _pair()
    if existing:  # .grad already holds something: both paths must add to it
        for m in (model, twin):
            for p in m.parameters():
                p.grad = torch.full_like(p, 0.25)
    fused = _grad_after(True, model, x, y, loss_fn)
    plain = _grad_after(False, twin, x, y, loss_fn)
    for a, b in zip(fused, plain, strict=True):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-12, atol=1e-15)


def test_grad_with_a_grad_scaler_is_the_scaled_gradient():
    model, twin, x, y = _pair(torch.float32)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    fused = _grad_after(True, model, x, y, _plain, grad_scaler=scalers[0], optimizer=opts[0])
    plain = _grad_after(False, twin, x, y, _plain, grad_scaler=scalers[1], optimizer=opts[1])
    for a, b in zip(fused, plain, strict=True):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-5, atol=1e-3)
    assert float(fused[0].abs().max()) > 10.0  # scaled by 2**10


def test_hooks_on_parameters_keep_the_two_pass_path():
    model, twin, x, y = _pair()
    seen = []
    model[0].weight.register_hook(lambda g: seen.append(g.shape) or g)
    visits = _backward_visits(model)
    fused = _grad_after(True, model, x, y, _plain)
    plain = _grad_after(False, twin, x, y, _plain)
    # T's batched backward and the loss's own backward both run (and both call the hook)
    assert visits[0] == 2 and len(seen) == 2
    for a, b in zip(fused, plain, strict=True):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-12)


class _Aux(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 1)

    def forward(self, x):
        z = torch.tanh(self.body(x))
        return self.head(z), self.aux(z)


def test_the_graph_walk_decides():
    torch.manual_seed(0)
    model = _Aux().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    out, aux = model(x)
    params = list(model.parameters())
    assert grad_only_through(out.square().mean(), out, [*model.body.parameters(), *model.head.parameters()])
    assert not grad_only_through(out.square().mean() + aux.mean(), out, params)  # an auxiliary head
    assert not grad_only_through(out.square().mean() + model.head.bias.sum(), out, params)  # a direct term
    # other parameters would be trained too
    assert not grad_only_through(out.square().mean(), out, list(model.head.parameters()))
    assert grad_only_through((out.square().mean() + aux.mean()), (out, aux), params)
    assert grad_only_through((out.square().mean() + aux.mean()), (out, aux), params, every_output=True)
    assert grad_only_through(out.square().mean(), (out, aux), params)  # aux unused: still only through
    assert not grad_only_through(out.square().mean(), (out, aux), params, every_output=True)  # not each
    assert not grad_only_through(out.detach().sum(), out, params)


@pytest.mark.parametrize("used", ["both", "head-only"])
def test_a_loss_of_some_outputs_leaves_the_others_grad_as_backward_would(used):
    """With several outputs, the loss rides on ``T``'s backward as one more root only where it reaches
    each output; a loss of the head alone (``aux`` an output of ``T`` only) takes ``loss.backward()``,
    so the auxiliary head's ``.grad`` stays ``None``, as without KWNG. Either way the direction is the
    split form's (capture, ``loss.backward()``, step)."""
    grads = {}
    for form in ("precondition", "split"):
        torch.manual_seed(0)
        model = _Aux().double()
        x = torch.randn(12, 4, dtype=torch.float64)
        kwng = KWNG(model.parameters(), generator=0, lr=0.1, clip_norm=None)
        out, aux = model(x)
        loss = out.square().mean() + (aux.square().mean() if used == "both" else 0.0)
        if form == "precondition":
            assert kwng.precondition((out, aux), loss)
        else:
            kwng.capture((out, aux), loss)
            loss.backward()
            assert kwng.step()
        grads[form] = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    aux_grads = [g for g, (name, _) in zip(grads["precondition"], _Aux().named_parameters(), strict=True)
                 if name.startswith("aux")]
    assert all((g is None) == (used == "head-only") for g in aux_grads)
    for a, b in zip(grads["precondition"], grads["split"], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-10)

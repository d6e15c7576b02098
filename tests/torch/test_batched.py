"""``T`` and ``g`` from one batched backward, against a dense Jacobian contraction in float64."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from wngkernels import AuthorsRule, Gaussian, nystrom_basis, t_matrix  # noqa: E402
from wngkernels.torch import flatten_outputs, jacobian_vjp_rows, t_matrix_and_grad  # noqa: E402

from .helpers import DEVICES, MODELS, dense_jacobian, make_model, rel_err, to_np  # noqa: E402


def _loss(out):
    outs = out if isinstance(out, tuple) else (out,)
    return sum((o**2).mean() + o.sin().sum() for o in outs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_t_matches_dense_jacobian_contraction(name, device):
    model, x = make_model(name, torch.float64, device)
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    samples, jac = dense_jacobian(model, x, params)
    basis = nystrom_basis(tuple(samples.shape), 6, rng=1)
    kernel = Gaussian(AuthorsRule()).resolve(samples[basis.indices.copy()], samples)
    t, g = t_matrix_and_grad(out, _loss(out), params, kernel=kernel, basis=basis)
    t_dense = t_matrix(samples, kernel=kernel, basis=basis, jacobian=jac)
    assert t.dtype == torch.float64 and t.shape == t_dense.shape
    assert rel_err(to_np(t), to_np(t_dense)) < 1e-12
    assert float(t.abs().max()) > 0
    g_ref = torch.autograd.grad(_loss(model(x)), params, allow_unused=True)
    g_ref = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                       for gi, p in zip(g_ref, params, strict=True)])
    np.testing.assert_allclose(to_np(g), to_np(g_ref), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", MODELS)
def test_batched_rows_equal_the_loop_of_backward_passes(name):
    model, x = make_model(name, torch.float64)
    params = list(model.parameters())
    out = model(x)
    d = flatten_outputs(out).shape[1]
    cot = torch.randn(5, x.shape[0], d, dtype=torch.float64)
    fast = jacobian_vjp_rows(out, cot, params, vjp_mode="batched")
    slow = jacobian_vjp_rows(out, cot, params, vjp_mode="loop")
    np.testing.assert_allclose(to_np(fast), to_np(slow), rtol=1e-12, atol=1e-14)


def test_float32_t_is_float32_and_close_to_float64():
    model, x = make_model("batchnorm", torch.float64)
    p64 = list(model.parameters())
    out = model(x)
    samples = flatten_outputs(out).detach()
    basis = nystrom_basis(tuple(samples.shape), 6, rng=2)
    kernel = Gaussian(AuthorsRule()).resolve(samples[basis.indices.copy()], samples)
    t64, _ = t_matrix_and_grad(out, out.sum(), p64, kernel=kernel, basis=basis)
    model32 = model.float()
    out32 = model32(x.float())
    t32, g32 = t_matrix_and_grad(out32, out32.sum(), list(model32.parameters()), kernel=kernel, basis=basis)
    assert t32.dtype == torch.float32 and g32.dtype == torch.float32
    assert rel_err(to_np(t32), to_np(t64)) < 1e-4


def test_unused_parameter_gets_zero_columns_and_frozen_ones_can_be_left_out():
    model, x = make_model("two_heads", torch.float64)
    params = list(model.parameters())
    out = model(x)
    samples = flatten_outputs(out).detach()
    basis = nystrom_basis(tuple(samples.shape), 4, rng=0)
    t, _ = t_matrix_and_grad(out, _loss(out), params, kernel=Gaussian(1.0), basis=basis)
    sizes = [p.numel() for p in params]
    start = sum(sizes[:-2])  # model.unused's weight and bias come last
    assert float(t[:, start:].abs().max()) == 0.0
    assert float(t[:, :start].abs().max()) > 0.0


def test_outputs_errors():
    model, x = make_model("mlp", torch.float64)
    params = list(model.parameters())
    out = model(x)
    with pytest.raises(ValueError, match="not attached to the autograd graph"):
        flatten_outputs(out.detach())
    with torch.no_grad():
        with pytest.raises(ValueError, match="not attached to the autograd graph"):
            flatten_outputs(model(x))
    with pytest.raises(ValueError, match=r"shape \(N, \.\.\.\)"):
        flatten_outputs(out.sum())
    with pytest.raises(ValueError, match="share the batch size"):
        flatten_outputs((out, out[:3]))
    with pytest.raises(TypeError, match="outputs must be a tensor"):
        flatten_outputs(np.zeros((3, 2)))
    basis = nystrom_basis((12, 3), 3, rng=0)
    with pytest.raises(ValueError, match="loss must be a scalar"):
        t_matrix_and_grad(out, out, params, kernel=Gaussian(1.0), basis=basis)
    with pytest.raises(ValueError, match="vjp_mode must be one of"):
        jacobian_vjp_rows(out, torch.zeros(2, 12, 3, dtype=torch.float64), params, vjp_mode="fast")


@pytest.mark.parametrize("name", ["mlp", "batchnorm", "shared"])
def test_the_dense_jacobian_reference_matches_finite_differences(name):
    """The float64 reference many tests lean on, against central differences of the model."""
    from .helpers import flat_outputs

    model, x = make_model(name, torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    samples, jac = dense_jacobian(model, x, params)
    h, cols = 1e-6, []
    with torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for j in range(flat.numel()):
                keep = float(flat[j])
                flat[j] = keep + h
                plus = flat_outputs(model(x))
                flat[j] = keep - h
                minus = flat_outputs(model(x))
                flat[j] = keep
                cols.append((plus - minus) / (2 * h))
    fd = torch.stack(cols, dim=-1)  # (N, d, q)
    assert fd.shape == jac.shape
    assert rel_err(to_np(jac), to_np(fd)) < 1e-7
    np.testing.assert_allclose(to_np(samples), to_np(flat_outputs(model(x))), rtol=1e-14)


def _conv_bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))


def _backward_calls(out, params, rows, run):
    """Calls of the convolution and BatchNorm backward operators while ``run(pieces)`` runs."""
    from torch.profiler import ProfilerActivity, profile

    pieces = [torch.randn(rows, *out.shape, dtype=out.dtype)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = run(pieces)
    counted = {e.key: e.count for e in prof.key_averages()}
    layers = ("aten::convolution_backward", "aten::native_batch_norm_backward")
    return [counted.get(k, 0) for k in layers], got, pieces


def test_batched_backward_runs_convolutions_once_and_batchnorm_once_per_row():
    """functorch's batching rules: each convolution's backward is one call whatever the number of
    rows (the older ``is_grads_batched`` ran it once per row: 7 calls for 6 rows); BatchNorm's
    backward runs its fused kernel once per row (``_rowwise``); the rows equal the loop of
    backward passes."""
    from wngkernels.torch._batched import batched_vjp

    model = _conv_bn_net().double()  # two convolutions, two BatchNorms
    params = list(model.parameters())
    out = model(torch.randn(4, 3, 8, 8, dtype=torch.float64))

    def run(mode):
        return lambda pieces: batched_vjp(out, pieces, params, vjp_mode=mode)

    (conv6, bn6), (_, mode), _ = _backward_calls(out, params, 6, run("auto"))
    (conv12, bn12), (fast, _), pieces = _backward_calls(out, params, 12, run("auto"))
    (conv_old, _), _, _ = _backward_calls(out, params, 6, run("legacy"))
    assert mode == "vmap"
    assert conv6 == conv12 <= 6 and conv_old >= 2 * 6  # one batched call per layer, against one per row
    assert (bn6, bn12) == (2 * (6 + 1), 2 * (12 + 1))  # per layer: the batched call, then one per row
    slow, _ = batched_vjp(out, pieces, params, vjp_mode="loop")
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-12, atol=1e-14)
    again, mode = batched_vjp(out, pieces, params, vjp_mode=mode)  # a settled mode is accepted
    assert mode == "vmap" and all(torch.equal(a, b) for a, b in zip(fast, again, strict=True))


def test_the_rowwise_batchnorm_rule_is_scoped_to_its_block():
    """Inside ``rowwise_batch_norm`` a user's own ``vmap`` over a backward runs BatchNorm once per
    row; outside (before and after, and after an exception inside) functorch's rule runs (one
    batched call per layer); the rows agree."""
    from wngkernels.torch._rowwise import rowwise_batch_norm

    model = _conv_bn_net().double()
    params = list(model.parameters())
    out = model(torch.randn(4, 3, 8, 8, dtype=torch.float64))

    def vmapped(pieces):
        return torch.func.vmap(lambda c: torch.autograd.grad(out, params, c, retain_graph=True))(pieces[0])

    (_, before), ref, pieces = _backward_calls(out, params, 5, vmapped)
    with rowwise_batch_norm():
        (_, inside), got, _ = _backward_calls(out, params, 5, lambda _: vmapped(pieces))
    with pytest.raises(KeyError), rowwise_batch_norm():
        raise KeyError("leaves the block")
    (_, after), _, _ = _backward_calls(out, params, 5, vmapped)
    # per layer: functorch's rule shows as two calls (the batched one, its inner one); ours as the
    # batched call and one per row
    assert (before, inside, after) == (2 * 2, 2 * (5 + 1), 2 * 2)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-12, atol=1e-14)


def test_the_rowwise_rule_is_registered_for_the_operators_of_the_device(monkeypatch):
    """Each registration costs host time in every batched backward: a CPU backward registers
    BatchNorm's native operator only, a CUDA one also cuDNN's (MIOpen's on ROCm); without a
    device, all three."""
    from wngkernels.torch import _rowwise
    from wngkernels.torch._rowwise import rowwise_batch_norm

    names = []
    real = _rowwise._register_rule

    def recording(lib, name, op):
        names.append(name)
        return real(lib, name, op)

    monkeypatch.setattr(_rowwise, "_register_rule", recording)
    accel = "miopen" if getattr(torch.version, "hip", None) else "cudnn"
    for device, expected in (("cpu", ["native"]), ("cuda", ["native", accel]),
                             (None, ["native", "cudnn", "miopen"])):
        names.clear()
        with rowwise_batch_norm(device):
            pass
        assert names == [f"{op}_batch_norm_backward" for op in expected]


def test_the_rowwise_rule_without_functorchs_private_functions_goes_through_register_vmap(monkeypatch):
    """The rule is a ``FuncTorchBatched`` kernel where functorch's private functions exist; without
    them ``torch.library.register_vmap`` registers the same rule: BatchNorm still runs once per row
    and the rows equal the loop's."""
    from wngkernels.torch import _rowwise
    from wngkernels.torch._batched import batched_vjp

    assert _rowwise._direct(torch.ops.aten.native_batch_norm_backward.default) is not None  # this PyTorch
    used = []
    real = torch.library.register_vmap

    def recording(name, *args, **kwargs):
        used.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(_rowwise, "_direct", lambda op: None)
    monkeypatch.setattr(torch.library, "register_vmap", recording)
    model = _conv_bn_net().double()
    params = list(model.parameters())
    out = model(torch.randn(4, 3, 8, 8, dtype=torch.float64))
    (_, bn), (fast, mode), pieces = _backward_calls(
        out, params, 5, lambda pieces: batched_vjp(out, pieces, params, vjp_mode="auto"))
    assert used == ["aten::native_batch_norm_backward"]
    assert mode == "vmap" and bn == 2 * (5 + 1)  # per layer: the batched call, then one per row
    slow, _ = batched_vjp(out, pieces, params, vjp_mode="loop")
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-12, atol=1e-14)


def test_mixed_precision_batchnorm_runs_under_vmap():
    """Under bfloat16 autocast BatchNorm mixes bfloat16 inputs with float32 weights, which
    functorch's own rule refuses; the per-row rule runs it, so the rows come from ``vmap``
    without a warning, equal to the loop of backward passes."""
    import warnings

    from wngkernels.torch._batched import batched_vjp

    model = _conv_bn_net()
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, 8, 8))
    pieces = [torch.randn(3, *out.shape, dtype=out.dtype)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast, mode = batched_vjp(out, pieces, params, vjp_mode="auto")
    assert mode == "vmap"
    slow, _ = batched_vjp(out, pieces, params, vjp_mode="loop")
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3 * float(b.abs().max()))


@pytest.mark.parametrize("refusal", [AttributeError("no such API"), None, "no-destroy"],
                         ids=["raises", "missing", "not-removable"])
def test_without_the_rowwise_rule_functorchs_rule_runs(monkeypatch, refusal):
    """A PyTorch that cannot register the per-row rule (``register_vmap`` missing or refusing an
    aten operator), or could not remove it afterwards, keeps functorch's own rule: the rows still
    come from ``vmap``, equal to the loop, with one batched BatchNorm call per layer."""
    from wngkernels.torch import _rowwise
    from wngkernels.torch._batched import batched_vjp

    if refusal is None:
        monkeypatch.setattr(torch.library, "register_vmap", None, raising=False)
    elif refusal == "no-destroy":
        monkeypatch.delattr(torch.library.Library, "_destroy")
    else:
        def refuse(*args, **kwargs):
            raise refusal
        monkeypatch.setattr(torch.library, "register_vmap", refuse)
        monkeypatch.setattr(_rowwise, "_direct", lambda op: None)  # the register_vmap path, refusing
    model = _conv_bn_net().double()
    params = list(model.parameters())
    out = model(torch.randn(4, 3, 8, 8, dtype=torch.float64))
    (_, bn), (fast, mode), pieces = _backward_calls(
        out, params, 5, lambda pieces: batched_vjp(out, pieces, params, vjp_mode="auto"))
    assert mode == "vmap" and bn == 2 * 2  # functorch's rule: one batched call (shown twice) per layer
    slow, _ = batched_vjp(out, pieces, params, vjp_mode="loop")
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-12, atol=1e-14)

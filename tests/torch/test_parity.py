"""Parity with the paper's algorithm where it matters: an ill-conditioned conv net with BatchNorm.

The reference (``tests/torch/authors.py``) re-derives the authors' direction densely in float64
(``D = 1/(‖T̃_j‖ + 1e-8)``, ``λ = 0``); ``KWNG`` runs on the network's own dtype with the same
batch and basis. A guard relative to the largest column norm (wngkernels 0.1) gave cosines of
0.01–0.7 here.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from wngkernels import nystrom_basis  # noqa: E402
from wngkernels.torch import KWNG  # noqa: E402

from . import authors  # noqa: E402
from .helpers import dense_jacobian  # noqa: E402

BATCH, CLASSES, M, EPS = 48, 10, 5, 1e-5


def _cos(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _flat(tensors) -> np.ndarray:
    return torch.cat([t.reshape(-1) for t in tensors]).detach().double().numpy()


def _cross_entropy(model, out, x, y):
    return F.cross_entropy(out, y)


def _kwng_direction(model, params, x, y, loss_fn, basis, sync_free=False):
    """``.grad`` after one ``precondition`` with this basis (no clipping, fixed ε)."""
    kwng = KWNG(params, num_basis=M, eps=EPS, adaptive_eps=False, clip_norm=None, lr=1.0, sync_free=sync_free)
    for p in model.parameters():
        p.grad = None
    out = model(x)
    assert kwng.precondition(out, loss_fn(model, out, x, y), basis=basis)
    assert kwng.num_fallbacks == 0
    return _flat([p.grad for p in params])


def _authors_direction(model, params, x, y, loss_fn, basis):
    """The reference in float64 on a float64 copy of the model (same weights, same batch)."""
    model64 = copy.deepcopy(model).double()
    names = {id(p): n for n, p in model.named_parameters()}
    params64 = [dict(model64.named_parameters())[names[id(p)]] for p in params]
    samples, jac = dense_jacobian(model64, x.double(), params64)
    g = torch.autograd.grad(loss_fn(model64, model64(x.double()), x.double(), y), params64)
    return authors.direction(_flat(g), samples.numpy(), jac.numpy(), basis.indices, basis.dims, EPS)


@pytest.mark.parametrize("sync_free", [False, True], ids=["default", "sync_free"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_direction_matches_the_authors_formula_on_an_ill_conditioned_net(dtype, sync_free):
    torch.manual_seed(0)
    model = authors.IllConditionedNet(CLASSES).to(dtype).train()
    params = list(model.parameters())
    cosines = []
    for i, (x, y) in enumerate(authors.digits_batches(BATCH, 8, seed=1, dtype=dtype)):
        basis = nystrom_basis((BATCH, CLASSES), M, rng=i)
        ours = _kwng_direction(model, params, x, y, _cross_entropy, basis, sync_free)
        ref = _authors_direction(model, params, x, y, _cross_entropy, basis)
        cosines.append(_cos(ours, ref))
    assert np.median(cosines) >= 0.999, cosines
    assert min(cosines) >= 0.99, cosines


class WithAuxiliary(nn.Module):
    """The ill-conditioned net plus parameters the outputs do not see: an auxiliary head on the
    features (trained by an auxiliary loss) and a learned loss weight."""

    def __init__(self):
        super().__init__()
        self.net = authors.IllConditionedNet(CLASSES)
        self.aux = nn.Linear(16, CLASSES)
        self.log_weight = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return self.net(x)


def _unseen(model: WithAuxiliary, kind: str):
    return list(model.aux.parameters()) if kind == "aux_head" else [model.log_weight]


def _loss(model: WithAuxiliary, out, x, y):
    main = F.cross_entropy(out, y)
    aux = F.cross_entropy(model.aux(model.net.features(x).mean(dim=(2, 3))), y)
    return torch.exp(-model.log_weight) * main + model.log_weight + 0.5 * aux


@pytest.mark.parametrize("sync_free", [False, True], ids=["default", "sync_free"])
@pytest.mark.parametrize("kind", ["aux_head", "loss_weight"])
def test_a_parameter_the_outputs_do_not_see_neither_takes_over_nor_freezes(kind, sync_free):
    """The rule of ``WhitenedSolver``: excluded from the solve, then ``w_U = ρ g_U``, share <= 1/2."""
    torch.manual_seed(0)
    model = WithAuxiliary().train()
    unseen = _unseen(model, kind)
    seen = list(model.net.parameters())
    params = seen + unseen  # the other kind of unseen parameter stays out: a constant here
    q_seen = sum(p.numel() for p in seen)
    shares, cosines, parity = [], [], []
    for i, (x, y) in enumerate(authors.digits_batches(BATCH, 8, seed=2)):
        basis = nystrom_basis((BATCH, CLASSES), M, rng=i)
        w = _kwng_direction(model, params, x, y, _loss, basis, sync_free)
        w_seen, w_unseen = w[:q_seen], w[q_seen:]
        # the same step with the unseen parameters frozen
        for p in unseen:
            p.requires_grad_(False)
        frozen = _kwng_direction(model, seen, x, y, _loss, basis, sync_free)
        for p in unseen:
            p.requires_grad_(True)
        cosines.append(_cos(w_seen, frozen))
        parity.append(_cos(w_seen, _authors_direction(model, seen, x, y, _loss, basis)))
        shares.append(np.linalg.norm(w_unseen) / np.linalg.norm(w))
        # its own move descends its loss: a step along -w_U alone lowers the loss
        model.zero_grad()
        g_unseen = _flat(torch.autograd.grad(_loss(model, model(x), x, y), unseen))
        assert np.dot(g_unseen, w_unseen) > 0
        step = 0.1 / np.linalg.norm(w)  # a step of norm 0.1 along the whole direction
        with torch.no_grad():
            before = float(_loss(model, model(x), x, y))
            offset = 0
            for p in unseen:
                p -= step * torch.as_tensor(w_unseen[offset:offset + p.numel()], dtype=p.dtype).view_as(p)
                offset += p.numel()
            after = float(_loss(model, model(x), x, y))
            offset = 0
            for p in unseen:
                p += step * torch.as_tensor(w_unseen[offset:offset + p.numel()], dtype=p.dtype).view_as(p)
                offset += p.numel()
        assert after < before, (after, before)
    assert min(cosines) >= 0.99, cosines
    assert np.median(parity) >= 0.999, parity
    assert 0.0 < min(shares) and max(shares) <= 0.5 + 1e-6, shares

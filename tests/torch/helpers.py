"""Models, devices and a dense-Jacobian reference for the PyTorch tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


class Shared(nn.Module):
    """One weight used by two layers (tied): its gradient sums both uses."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TwoHeads(nn.Module):
    """Several outputs of different shapes, flattened into (N, d) by KWNG."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.h1 = nn.Linear(6, 2)
        self.h2 = nn.Linear(6, 6)
        self.unused = nn.Linear(2, 2)  # reached by no output

    def forward(self, x):
        z = torch.tanh(self.body(x))
        return self.h1(z), self.h2(z).reshape(-1, 3, 2)


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.head = nn.Linear(3 * 4, 3)

    def forward(self, idx):
        return self.head(self.emb(idx).reshape(idx.shape[0], -1))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def make_model(name: str, dtype=torch.float64, device="cpu", seed=0):
    """A small model and a batch of inputs for it."""
    torch.manual_seed(seed)
    n = 12
    if name == "mlp":
        model, x = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), torch.randn(n, 4)
    elif name == "batchnorm":
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
        x = torch.randn(n, 4)
    elif name == "transformer":
        model, x = Attention(), torch.randn(n, 5, 8)
    elif name == "embedding":
        model, x = Embed(), torch.randint(0, 7, (n, 4))
    elif name == "shared":
        model, x = Shared(), torch.randn(n, 4)
    elif name == "two_heads":
        model, x = TwoHeads(), torch.randn(n, 4)
    else:
        raise ValueError(name)
    model = model.to(device=device, dtype=dtype).train()
    x = x.to(device) if not x.is_floating_point() else x.to(device=device, dtype=dtype)
    return model, x


MODELS = ["mlp", "batchnorm", "transformer", "embedding", "shared", "two_heads"]


def flat_outputs(out):
    outs = out if isinstance(out, tuple) else (out,)
    return torch.cat([o.reshape(o.shape[0], -1) for o in outs], dim=1)


def dense_jacobian(model, x, params):
    """``X`` ``(N, d)`` and the dense Jacobian ``(N, d, q)`` by ``torch.autograd.functional.jacobian``."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]

    def f(*values):
        return flat_outputs(torch.func.functional_call(model, dict(zip(keys, values, strict=True)), (x,)))

    with torch.no_grad():
        xs = f(*[p.detach() for p in params])
    jac = torch.autograd.functional.jacobian(f, tuple(p.detach() for p in params), vectorize=True)
    n, d = xs.shape
    return xs, torch.cat([j.reshape(n, d, -1) for j in jac], dim=2)


def to_np(t):
    return t.detach().cpu().numpy()


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))

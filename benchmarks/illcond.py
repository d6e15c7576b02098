"""The seed's ill-conditioned problem, shared by the PyTorch benchmark scripts.

- :class:`ResNet18`: ResNet-18 (BasicBlock ``[2, 2, 2, 2]``, CIFAR stem, BatchNorm) whose logits
  are multiplied class by class by ``logspace(-6, 1, classes)``, the seed's construction;
- :func:`digits_32`: scikit-learn's digits upsampled to ``3 × 32 × 32`` (no download);
- :class:`AuthorsRecipe`: the authors' 2019 KWNG step, written independently of ``wngkernels``
  from the paper's algorithm and the defaults of their published configuration: the anchor
  every benchmark compares with, in the same run, on the same GPU.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs; logits scaled by ``logspace(-6, 1, classes)`` (the seed's construction).

    ``width`` is the first stage's channel count (64 in ResNet-18; smaller for CPU smoke runs);
    ``scaled=False`` drops the scaling (the well-conditioned contrast).
    """

    def __init__(self, classes: int = 10, width: int = 64, scaled: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            layers += [BasicBlock(cin, width * mult, stride), BasicBlock(width * mult, width * mult, 1)]
            cin = width * mult
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)
        scale = torch.logspace(-6, 1, classes) if scaled else torch.ones(classes)
        self.register_buffer("scale", scale)

    def forward(self, x):
        z = F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)
        return self.fc(z) * self.scale


def digits_32(device, size: int = 32):
    """Digits ``(x_train, y_train, x_test, y_test)``: 1347 / 450 images ``(3, size, size)``, standardised.

    scikit-learn's 8×8 digits, a stratified 75/25 split (``random_state=0``), bilinear
    upsampling, the grey level copied to three channels, standardised with the training
    set's mean and standard deviation.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = x_tr.mean(), x_tr.std()

    def prep(a):
        t = torch.as_tensor((a - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        return t.expand(-1, 3, -1, -1).contiguous().to(device)

    return prep(x_tr), torch.as_tensor(y_tr, device=device), prep(x_te), torch.as_tensor(y_te, device=device)


class AuthorsRecipe:
    r"""One KWNG step as the authors' 2019 code takes it (the anchor; independent of wngkernels).

    Per step, on the batch's outputs ``X`` ``(N, d)``: ``M`` basis points drawn uniformly from
    the batch, one coordinate each (torch's default generator); ``ℓ² = mean_{m,n} ‖Y_m − X_n‖²``;
    ``C Cᵀ = N⁻¹ Σ_{n,i} H H`` from the Gaussian cross-derivatives; ``T`` from ``M`` separate
    backward passes, row ``m`` the gradient of ``mean_n ∂_{x_{i_m}} k(Y_m, X_n)``; then the
    loss's own backward for ``g``. The solve: an SVD of ``C Cᵀ`` in float64,
    ``T̃ = S^{-1/2} Uᵀ T``, ``D = 1/(‖T̃_j‖ + 1e-8)``,
    ``w = D (g − T̃ᵀ (T̃ D T̃ᵀ + ε P)⁻¹ T̃ D g) / ε``; ``g`` where ``⟨g, w⟩ <= 0``; ``w`` scaled to
    norm ``clip`` if longer. ``ε`` (start ``1e-5``) follows the reduction ratio
    ``r = 2 (L_prev − L) / (lr ⟨g_prev, w_prev⟩)``: every ``window`` steps, ``ε ← ε/0.85`` if
    ``max r < 0.25``, ``ε ← 0.85 ε`` if ``max r > 0.75``, within ``[1e-10, 1e5]``.

    Call :meth:`step` after the forward pass, in place of ``loss.backward()``; it writes
    ``.grad``, and the optimizer steps as usual.
    """

    def __init__(self, params, num_basis: int = 5, eps: float = 1e-5, clip: float = 1.0, window: int = 5,
                 factor: float = 0.85, guard: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.num_basis, self.eps, self.clip, self.window, self.factor, self.guard = (
            num_basis, eps, clip, window, factor, guard)
        self.prev_loss = None
        self.prev_gw = 0.0
        self.r_max = 0.0
        self.count = 0
        self.fallbacks = 0
        self.last_basis = None  # (indices, dims) of the last draw

    def _adapt(self, loss: float, lr: float) -> None:
        if self.prev_loss is not None and self.prev_gw > 0:
            self.r_max = max(self.r_max, 2.0 * (self.prev_loss - loss) / (lr * self.prev_gw))
        self.count += 1
        if self.prev_loss is not None and self.count % self.window == 0:
            if self.r_max < 0.25 and self.eps < 1e5:
                self.eps /= self.factor
            if self.r_max > 0.75 and self.eps > 1e-10:
                self.eps *= self.factor
            self.r_max = 0.0

    def step(self, outputs: torch.Tensor, loss: torch.Tensor, lr: float) -> None:
        self._adapt(float(loss.detach()), lr)
        x = outputs.reshape(outputs.shape[0], -1)
        n, d = x.shape
        m = self.num_basis
        idx = torch.randperm(n)[:m].to(x.device)
        dims = torch.randint(0, d, (m,)).to(x.device)
        self.last_basis = (idx.cpu().numpy(), dims.cpu().numpy())
        diff = x.detach()[idx][:, None, :] - x[None, :, :]  # (M, N, d), Y_m − X_n, attached to X
        sq = (diff * diff).sum(-1)
        ell2 = sq.mean().detach()
        k = torch.exp(-0.5 * sq / ell2)  # (M, N)
        sel = diff[torch.arange(m, device=x.device), :, dims]  # (Y_m − X_n)_{i_m}
        with torch.no_grad():
            onehot = F.one_hot(dims, d).to(x.dtype)
            rows = k[:, :, None] * (onehot[:, None, :] / ell2 - sel[:, :, None] * diff / ell2**2)
            cc = torch.einsum("mni,kni->mk", rows, rows) / n
        dkdx = (-sel * k / ell2).mean(dim=1)  # (M,): N⁻¹ Σ_n ∂_{x_{i_m}} k(Y_m, X_n)
        t = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(dkdx[j], self.params,
                                                                                  retain_graph=True)])
                         for j in range(m)])
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in self.params])
        w, gw = self._solve(cc, t, g)
        self.prev_loss, self.prev_gw = float(loss.detach()), gw
        offset = 0
        for p in self.params:
            p.grad.copy_(w[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def _solve(self, cc, t, g):
        _, s, vh = torch.linalg.svd(cc.double())
        keep = s > 0
        inv_sqrt = torch.where(keep, 1.0 / torch.sqrt(torch.where(keep, s, 1.0)), 0.0)
        tw = (inv_sqrt[:, None] * vh).to(t.dtype) @ t
        dd = 1.0 / (torch.linalg.vector_norm(tw, dim=0) + self.guard)
        lhs = (tw * dd) @ tw.T + self.eps * torch.diag(keep.to(t.dtype))
        inner = torch.linalg.lstsq(lhs, (tw @ (dd * g))[:, None]).solution[:, 0]
        w = dd * (g - tw.T @ inner) / self.eps
        gw = float(torch.dot(g, w))
        if not (math.isfinite(gw) and gw > 0):
            w, gw = g, float(torch.dot(g, g))
            self.fallbacks += 1
        norm = float(torch.linalg.vector_norm(w))
        if norm > self.clip:
            w, gw = w * (self.clip / norm), gw * self.clip / norm
        return w, gw


def train_step(model, opt, kwng, x, y) -> None:
    """One step: forward, cross-entropy, backward (or ``kwng.precondition``), ``opt.step()``."""
    out = model(x)
    loss = F.cross_entropy(out, y)
    opt.zero_grad()
    if kwng is None:
        loss.backward()
    else:
        kwng.precondition(out, loss)
    opt.step()


def t_outputs(model, x, take: int | None = None, cast: torch.dtype | None = None):
    """The outputs ``T`` is taken from when it has its own forward: of the first ``take`` samples
    (all with ``None``), under autocast to ``cast`` where one is given (``T``'s backward then runs
    in that dtype)."""
    with torch.autocast(x.device.type, dtype=cast) if cast else contextlib.nullcontext():
        return model(x[:take])


def seeded(seed: int):
    """A NumPy generator for batch orders, one per seed (the same batches for every method)."""
    return np.random.default_rng([seed, 2019])

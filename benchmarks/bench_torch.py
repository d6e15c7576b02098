"""asv: one ``wngkernels.torch.KWNG.precondition`` step on a small MLP, against plain backward.

Skipped (``NotImplementedError`` in ``setup``) when torch or ``wngkernels.torch`` is missing.
The model: 784 → 256 → 256 → 10 with ReLU, float32, a batch of 128 random inputs and labels;
``h_θ(Z)`` is the batch of logits (``N = 128``, ``d = 10``), as in the authors' classifiers.
"""

from __future__ import annotations

import importlib

from . import _backends

BATCH, WIDTH, INPUTS, CLASSES = 128, 256, 784, 10


def _kwng_class():
    try:
        module = importlib.import_module("wngkernels.torch")
    except ImportError as exc:
        raise NotImplementedError(f"wngkernels.torch is not importable: {exc}") from None
    if not hasattr(module, "KWNG"):
        raise NotImplementedError("wngkernels.torch has no KWNG")
    return module.KWNG


class _MLPStep:
    """Shared setup: the model, one batch, the loss, on the backend's device."""

    def _build(self, backend):
        if backend not in ("torch-cpu", "torch-cuda"):
            raise NotImplementedError(f"{backend}: the preconditioner is PyTorch only")
        self.be = _backends.get(backend)
        torch = self.be.xp
        gen = torch.Generator().manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(INPUTS, WIDTH), torch.nn.ReLU(),
            torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(),
            torch.nn.Linear(WIDTH, CLASSES),
        ).to(self.be.device)
        self.x = torch.randn(BATCH, INPUTS, generator=gen).to(self.be.device)
        self.y = torch.randint(0, CLASSES, (BATCH,), generator=gen).to(self.be.device)
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def _forward(self):
        self.model.zero_grad(set_to_none=True)
        out = self.model(self.x)
        return out, self.loss_fn(out, self.y)


class Precondition(_MLPStep):
    """Forward, loss and ``kwng.precondition(outputs, loss)`` (which fills every ``.grad``)."""

    params = [["torch-cpu", "torch-cuda"], [5, 20, 64]]
    param_names = ["backend", "num_basis"]
    timeout = 300

    def setup(self, backend, num_basis):
        kwng_class = _kwng_class()
        self._build(backend)
        # lr: the adaptive-eps rule reads it (the step is then the one a training loop takes)
        self.kwng = kwng_class(self.model.parameters(), num_basis=num_basis, lr=0.1)
        self.time_precondition(backend, num_basis)  # warm-up

    def time_precondition(self, backend, num_basis):
        out, loss = self._forward()
        self.kwng.precondition(out, loss)
        self.be.sync()


class Backward(_MLPStep):
    """The baseline: forward, loss and ``loss.backward()`` (what plain SGD needs per step)."""

    params = [["torch-cpu", "torch-cuda"]]
    param_names = ["backend"]

    def setup(self, backend):
        self._build(backend)
        self.time_backward(backend)

    def time_backward(self, backend):
        _, loss = self._forward()
        loss.backward()
        self.be.sync()

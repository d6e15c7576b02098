"""A bound for the exact KWNG step: the same step with no read of the device, eager and in a CUDA graph.

Not the library's step, and not a preconditioner to train with: a fixed-structure ``M = 5`` step
on the seed's ResNet-18 that never reads a value back to the host, to measure what
``KWNG.precondition`` could cost if it did not (issue 14). It keeps the library's batched
backward (``T``'s rows and the loss's row in one ``vmap``-ed backward, the per-row BatchNorm rule)
and replaces everything that reads: the basis is drawn on the device, the ``AuthorsRule``
bandwidth stays a tensor, ``C Cᵀ`` is whitened by its Cholesky factor, ``D = 1/(‖T̃_j‖ + 1e-8)``,
the direction comes from the Woodbury form through a Cholesky factor of ``T̃ D T̃ᵀ + εI``, the
fallback to ``g`` and the clipping are ``torch.where``, and the parameters move by SGD. With
``--check`` its direction is compared with ``KWNG.precondition``'s on the same basis.

Methods (``--methods``; every one timed in the same run, rounds interleaved, the block timer of
``torch_step.py``): ``sgd``, ``authors5``, ``kwng5``, ``refresh10`` (as in ``torch_step.py``);
``lean`` and ``lean10`` (``refresh_every=10``), eager; ``sgd_graph``, ``lean_graph`` and
``lean10_graph``, captured in CUDA graphs (CUDA only); ``lean_read``, ``lean_reads10``,
``lean_eigh`` and ``lean_eigh_host``, the lean step with one read before the batched backward,
ten reads after it, four ``M × M`` eigen-decompositions on the GPU, or the same four on the host.

    python benchmarks/lean_step.py --device cuda --rounds 2
    python benchmarks/lean_step.py --quick          # CPU smoke run (no graphs)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from solve_time import mean_ms  # noqa: E402
from torch_step import make_problem, make_step  # noqa: E402

from wngkernels.torch._batched import _rows_from_grads, _split_cotangents, batched_vjp  # noqa: E402

M, LR, EPS, CLIP = 5, 1e-3, 1e-5, 1.0


class LeanStep:
    """The read-free step on ``make_problem("resnet18")``'s model and batch.

    Parameters
    ----------
    device : torch.device
    batch, width : int
        As in ``torch_step.py``.
    refresh_every : int
        Between refreshes only ``g`` is computed; the direction reuses ``T̃`` and ``D``.
    read_before : bool
        One read of the device before the batched backward.
    reads_after : int
        This many reads after it.
    eigh : {None, "gpu", "host"}
        Whitening by four ``M × M`` eigen-decompositions on the GPU or on the host instead of
        one Cholesky factor (the time of the factorisation's reads; the last one is used).
    clip : float
        ``w`` is scaled down to this norm if longer.
    """

    def __init__(self, device, batch: int, width: int, refresh_every: int = 1, read_before: bool = False,
                 reads_after: int = 0, eigh: str | None = None, clip: float = CLIP):
        torch.manual_seed(0)
        self.device = device
        self.model, self.x, self.y, self.loss_fn = make_problem("resnet18", device, batch, width)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        q = sum(p.numel() for p in self.params)
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.t_white = torch.zeros(M, q, device=device)
        self.damping = torch.ones(q, device=device)
        self.every, self.read_before = refresh_every, read_before
        self.reads_after, self.eigh, self.clip = reads_after, eigh, clip
        self.flat_basis = None  # (M,) indices into the flattened (N, d) outputs; None: drawn
        self.calls = 0

    def _rows(self, xd):
        """The kernel's rows ``(M, N, d)`` (the authors' Gaussian cross-derivatives) and ``C Cᵀ``."""
        n, d = xd.shape
        flat = self.flat_basis
        if flat is None:
            flat = torch.randint(0, n * d, (M,), device=self.device)
        idx, dims = flat // d, flat % d
        points = xd.index_select(0, idx)
        center = xd.mean(0)
        ell2 = ((points - center) ** 2).sum(1).mean() + ((xd - center) ** 2).sum(1).mean()
        diff = points[:, None, :] - xd[None, :, :]
        k = torch.exp(-0.5 * (diff * diff).sum(-1) / ell2)
        onehot = (dims[:, None] == torch.arange(d, device=self.device)).to(xd.dtype)
        sel = (diff * onehot[:, None, :]).sum(-1)
        rows = k[:, :, None] * (onehot[:, None, :] / ell2 - sel[:, :, None] * diff / ell2**2)
        flat_rows = rows.reshape(M, -1)
        return rows, flat_rows @ flat_rows.T / n

    def _whitening(self, cc):
        eye = torch.eye(M, device=self.device)
        for _ in range(self.reads_after):
            float(cc[0, 0])
        if self.eigh is None:
            chol, _ = torch.linalg.cholesky_ex(cc + 1e-6 * torch.diagonal(cc).mean() * eye)
            # the M × M inverse, then one product: a triangular solve with q right-hand sides takes seconds
            return torch.linalg.solve_triangular(chol, eye, upper=False)
        for _ in range(4):
            if self.eigh == "gpu":
                lam, u = torch.linalg.eigh(cc)
                factor = (u / lam.clamp_min(1e-30).sqrt()).T
            else:
                lam, u = torch.linalg.eigh(cc.cpu().double())
                factor = (u / lam.clamp_min(1e-300).sqrt()).T.float().pin_memory()
                factor = factor.to(self.device, non_blocking=True)
        return factor

    def _direction(self, g):
        """Woodbury: ``w = D (g − T̃ᵀ (T̃ D T̃ᵀ + εI)⁻¹ T̃ D g) / ε``, then fallback and clipping."""
        b = self.t_white * self.damping
        chol, _ = torch.linalg.cholesky_ex(b @ self.t_white.T + EPS * torch.eye(M, device=self.device))
        v = torch.cholesky_solve((b @ g)[:, None], chol)[:, 0]
        w = self.damping * (g - v @ self.t_white) / EPS
        gw = torch.dot(g, w)
        w = torch.where(torch.isfinite(gw) & (gw > 0), w, g)
        return w * torch.clamp(self.clip / torch.linalg.vector_norm(w), max=1.0)

    def _update(self, w):
        sizes = [p.numel() for p in self.params]
        pieces = torch.split(w, sizes)
        torch._foreach_copy_(self.grads, [v.view_as(p) for v, p in zip(pieces, self.params, strict=True)])
        with torch.no_grad():
            torch._foreach_add_(self.params, self.grads, alpha=-LR)

    def refresh(self, update: bool = True):
        """The full step: forward, one batched backward for ``T`` and ``g``, whitening, ``D``, ``w``."""
        out = self.model(self.x)
        loss = self.loss_fn(out, self.y)
        xd = out.detach().reshape(out.shape[0], -1)
        rows, cc = self._rows(xd)
        if self.read_before:
            float(cc[0, 0])
        loss_cot = torch.autograd.grad(loss, [out], retain_graph=True)[0]
        pieces = [torch.cat([_split_cotangents([out], rows / xd.shape[0])[0], loss_cot[None]])]
        grads, _ = batched_vjp([out], pieces, self.params, vjp_mode="batched", retain_graph=False)
        t = _rows_from_grads([gr[:M] for gr in grads], self.params, M, torch.float32)
        g = torch.cat([gr[M].reshape(-1) for gr in grads])
        self.t_white.copy_(self._whitening(cc) @ t)
        self.damping.copy_(1.0 / (torch.linalg.vector_norm(self.t_white, dim=0) + 1e-8))
        w = self._direction(g)
        if update:
            self._update(w)
        return w

    def cached(self):
        """A step between refreshes: forward, the loss's backward, ``w`` from the kept ``T̃`` and ``D``."""
        loss = self.loss_fn(self.model(self.x), self.y)
        g = torch.cat([v.reshape(-1) for v in torch.autograd.grad(loss, self.params)])
        self._update(self._direction(g))

    def step(self):
        (self.refresh if self.calls % self.every == 0 else self.cached)()
        self.calls += 1

    def graphed(self):
        """The step as CUDA graph replays (one graph for the refresh, one for the steps between)."""
        graphs = [_capture(self.refresh)] + ([_capture(self.cached)] if self.every > 1 else [])

        def replay():
            graphs[0 if self.calls % self.every == 0 else 1].replay()
            self.calls += 1
        return replay


def _capture(fn) -> torch.cuda.CUDAGraph:
    """``fn`` captured after three warm-up calls on a side stream (cuDNN's choices settled)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _sgd_graph(device, batch, width):
    torch.manual_seed(0)
    model, x, y, loss_fn = make_problem("resnet18", device, batch, width)
    params = [p for p in model.parameters() if p.requires_grad]

    def one():
        gl = torch.autograd.grad(loss_fn(model(x), y), params)
        with torch.no_grad():
            torch._foreach_add_(params, list(gl), alpha=-LR)
    return _capture(one).replay


def check_direction(device, batch: int, width: int, trials: int = 3) -> list[float]:
    """Cosines between the lean direction and ``KWNG.precondition``'s on the same basis (no clipping,
    fixed ``ε``)."""
    from wngkernels.nystrom import NystromBasis
    from wngkernels.torch import KWNG

    lean, cosines = LeanStep(device, batch, width, clip=float("inf")), []
    d = lean.model(lean.x).shape[1]
    for trial in range(trials):
        gen = torch.Generator().manual_seed(trial)
        idx, dims = torch.randperm(batch, generator=gen)[:M], torch.randint(0, d, (M,), generator=gen)
        lean.flat_basis = (idx * d + dims).to(device)
        w = lean.refresh(update=False)
        kwng = KWNG(lean.params, num_basis=M, eps=EPS, adaptive_eps=False, clip_norm=None)
        for p in lean.params:
            p.grad = None
        out = lean.model(lean.x)
        kwng.precondition(out, lean.loss_fn(out, lean.y), basis=NystromBasis(idx.numpy(), dims.numpy()))
        ref = torch.cat([p.grad.reshape(-1) for p in lean.params])
        cosines.append(float(torch.dot(w, ref) / (w.norm() * ref.norm())))
    return cosines


METHODS = ("sgd", "authors5", "kwng5", "refresh10", "lean", "lean10", "sgd_graph", "lean_graph",
           "lean10_graph", "lean_read", "lean_reads10", "lean_eigh", "lean_eigh_host")


def _make(name, args, device):
    library = {"sgd": ("sgd", 0, {}), "authors5": ("authors", 5, {}), "kwng5": ("kwng", 5, {}),
               "refresh10": ("kwng", 5, {"refresh_every": 10})}
    if name in library:
        spec = argparse.Namespace(model="resnet18", batch=args.batch, width=args.width, compile=False)
        return make_step(*library[name], spec, device)
    if name == "sgd_graph":
        return _sgd_graph(device, args.batch, args.width)
    options = {"lean": {}, "lean_graph": {}, "lean10": {"refresh_every": 10},
               "lean10_graph": {"refresh_every": 10}, "lean_read": {"read_before": True},
               "lean_reads10": {"reads_after": 10}, "lean_eigh": {"eigh": "gpu"},
               "lean_eigh_host": {"eigh": "host"}}[name]
    lean = LeanStep(device, args.batch, args.width, **options)
    return lean.graphed() if name.endswith("_graph") else lean.step


def parser(description: str, methods, rounds: int) -> argparse.ArgumentParser:
    """The options every step-bound script shares (this one and ``step_reads.py``)."""
    ap = argparse.ArgumentParser(description=description)
    default = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=default, choices=["cuda", "cpu"])
    ap.add_argument("--methods", help="comma-separated subset of " + ", ".join(methods))
    ap.add_argument("--steps", type=int, default=20, help="consecutive timed steps per round (mean reported)")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    return ap


def interleaved(steps: dict, device, args) -> dict[str, list[float]]:
    """Each step's mean time per round, the methods interleaved within each round (a drift of the
    machine touches every method alike)."""
    per_round = {n: [] for n in steps}
    for _ in range(args.rounds):
        for n, step in steps.items():
            per_round[n].append(mean_ms(step, device, args.steps, args.warmup))
    return per_round


def ratio(per_round: dict[str, list[float]], n: str, ref: str) -> str:
    """The median over the rounds of ``n``'s time over ``ref``'s in the same round ("—" without ``ref``)."""
    if ref not in per_round:
        return "—"
    return f"{statistics.median(a / b for a, b in zip(per_round[n], per_round[ref], strict=True)):.2f}"


def report(per_round: dict[str, list[float]], args, device, m: int, extra: dict[str, dict] | None = None):
    """Print the table (median ms, × SGD, × the authors' recipe, then each ``extra`` column: its name
    → method → value) and return the median ms per method."""
    extra = extra or {}
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"resnet18, batch {args.batch}, M = {m}, mean over {args.steps} consecutive steps per round, "
          f"{args.rounds} interleaved round(s) (median), {dev}, torch {torch.__version__}")
    head = ["method", "ms/step", "× SGD", "× authors' recipe", *extra]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for n, v in per_round.items():
        cells = [n, f"{statistics.median(v):.2f}", ratio(per_round, n, "sgd"),
                 ratio(per_round, n, "authors5"), *(str(col.get(n, "—")) for col in extra.values())]
        print("| " + " | ".join(cells) + " |")
    return {n: statistics.median(v) for n, v in per_round.items()}


def main(argv=None):
    ap = parser(__doc__.splitlines()[0], METHODS, rounds=2)
    ap.add_argument("--check", action="store_true", help="compare the lean direction with KWNG's first")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke run: 2 steps, batch 16, width 8, no graphs")
    args = ap.parse_args(argv)
    if args.quick:
        args.device, args.steps, args.warmup, args.batch, args.width = "cpu", 2, 1, 16, 8
    device = torch.device(args.device)
    names = args.methods.split(",") if args.methods else [
        n for n in METHODS if device.type == "cuda" or not (n.endswith("_graph") or n == "lean_eigh_host")]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if device.type != "cuda" and any(n.endswith("_graph") for n in names):
        ap.error("CUDA graphs need --device cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.check:
        cosines = check_direction(device, args.batch, args.width)
        print("cosine(lean, KWNG) on the same basis:", ", ".join(f"{c:.6f}" for c in cosines))
    return report(interleaved({n: _make(n, args, device) for n in names}, device, args), args, device, M)


if __name__ == "__main__":
    main()

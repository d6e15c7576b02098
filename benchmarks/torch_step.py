"""Step time of KWNG against plain SGD and the authors' recipe, in the same run on the same device.

One step = forward, backward (and the preconditioner), ``SGD.step``, on a fixed random batch;
the mean per step of ``--steps`` consecutive steps timed as one block after ``--warmup``,
GPU-synchronised at the block's ends: the amortised cost, so ``refresh_every=10`` pays its
refreshes (keep ``--steps`` a multiple of 10 for it). With ``--rounds k``
the methods are timed in ``k`` interleaved rounds (every method once per round) and each ratio is
taken within a round, so a drift of the machine's speed touches both sides of it. Methods:

- ``sgd``: ``loss.backward()``;
- ``authors M=k``: ``benchmarks/illcond.AuthorsRecipe`` — ``M`` backward passes for ``T``, then
  the loss's backward, the authors' solve (the anchor every ratio is read against);
- ``kwng M=k``: ``KWNG.precondition`` (one batched backward for ``T`` and ``g`` when the loss
  reaches the parameters only through the outputs, as here);
- ``kwng split M=k``: ``capture``, ``loss.backward()``, ``step`` (two backward passes);
- ``kwng loop M=k``: ``vjp_mode="loop"``; ``kwng M=5 refresh=10``: ``refresh_every=10``;
- ``syncfree5``, ``syncfree_refresh10``, ``syncfree64``: ``sync_free=True`` (no read of the device);
- ``cached``, ``syncfree_cached``: no refresh after the first step (the steps between refreshes);
- ``sub32``/``sub16``: ``T`` from a 32-/16-sample sub-batch with its own forward (split form:
  ``capture(model(x[:k]), loss)``, ``loss.backward()``, ``step``);
- ``bf16T``/``sub32bf16T``: ``T`` from its own forward under bfloat16 autocast (whole batch / 32
  samples), so ``T``'s backward runs in bfloat16.

Models (``--model``): ``resnet18`` — the seed's ill-conditioned ResNet-18 (CIFAR stem, logits ×
``logspace(-6, 1, 10)``), 3×32×32; ``resnet50`` — torchvision's ResNet-50 (10 classes) at
3×64×64; ``vit`` — timm's ViT-Tiny (patch 16, 10 classes) at 3×224×224; ``lm`` — a 4-layer
Transformer language model (width 256, vocabulary 1000, 64 tokens; the outputs are the logits
of the last 8 positions). ``--compile`` wraps the model in ``torch.compile`` (default settings).

    python benchmarks/torch_step.py --device cuda
    python benchmarks/torch_step.py --device cuda --model resnet50 --methods sgd,authors5,kwng5,refresh10
    python benchmarks/torch_step.py --quick          # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from illcond import AuthorsRecipe, ResNet18, t_outputs  # noqa: E402
from solve_time import mean_ms  # noqa: E402

from wngkernels.torch import KWNG  # noqa: E402


class TinyLM(nn.Module):
    """A 4-layer causal Transformer language model; outputs the logits of the last ``tail`` tokens."""

    def __init__(self, vocab: int = 1000, width: int = 256, layers: int = 4, tail: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(1, 64, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(width, vocab)
        self.tail = tail

    def forward(self, tokens):
        n = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=tokens.device)
        h = self.body(self.embed(tokens) + self.pos[:, :n], mask=mask, is_causal=True)
        return self.head(h[:, -self.tail:])


def make_problem(name: str, device, batch: int, width: int = 64):
    """``(model, inputs, targets, loss_fn)`` for one of the models."""
    gen = torch.Generator().manual_seed(0)
    if name == "resnet18":
        model = ResNet18(width=width)
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
    elif name == "resnet50":
        import torchvision

        model = torchvision.models.resnet50(num_classes=10)
        x = torch.randn(batch, 3, 64, 64, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
    elif name == "vit":
        import timm

        model = timm.create_model("vit_tiny_patch16_224", num_classes=10)
        x = torch.randn(batch, 3, 224, 224, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
    elif name == "lm":
        model = TinyLM()
        x = torch.randint(0, 1000, (batch, 64), generator=gen)
        y = torch.randint(0, 1000, (batch, model.tail), generator=gen)
    else:
        raise ValueError(f"unknown model {name!r}")

    def loss_fn(out, y):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    return model.to(device).train(), x.to(device), y.to(device), loss_fn


def _methods(quick: bool):
    """name → (kind, num_basis, KWNG options)."""
    out = {"sgd": ("sgd", 0, {}), "authors5": ("authors", 5, {}), "kwng5": ("kwng", 5, {}),
           "split5": ("split", 5, {}), "loop5": ("kwng", 5, {"vjp_mode": "loop"}),
           "refresh10": ("kwng", 5, {"refresh_every": 10}),
           "syncfree5": ("kwng", 5, {"sync_free": True}),
           "syncfree_refresh10": ("kwng", 5, {"sync_free": True, "refresh_every": 10}),
           "cached": ("kwng", 5, {"refresh_every": 10**9}),
           "syncfree_cached": ("kwng", 5, {"sync_free": True, "refresh_every": 10**9}),
           "sub32": ("sub", 5, {"t_batch": 32}), "sub16": ("sub", 5, {"t_batch": 16}),
           "bf16T": ("sub", 5, {"t_autocast": torch.bfloat16}),
           "sub32bf16T": ("sub", 5, {"t_batch": 32, "t_autocast": torch.bfloat16})}
    if not quick:
        out.update({"authors64": ("authors", 64, {}), "kwng64": ("kwng", 64, {}),
                    "loop64": ("kwng", 64, {"vjp_mode": "loop"}),
                    "syncfree64": ("kwng", 64, {"sync_free": True})})
    return out


LABELS = {"sgd": "SGD", "authors5": "authors' recipe M=5", "kwng5": "KWNG M=5 (precondition)",
          "split5": "KWNG M=5 split form (2 backward)", "loop5": "KWNG M=5 vjp_mode=loop",
          "refresh10": "KWNG M=5 refresh_every=10", "sub32": "KWNG M=5, T from 32 samples",
          "sub16": "KWNG M=5, T from 16 samples", "bf16T": "KWNG M=5, T's forward and backward in bf16",
          "sub32bf16T": "KWNG M=5, T from 32 samples in bf16", "authors64": "authors' recipe M=64",
          "kwng64": "KWNG M=64 (precondition)", "loop64": "KWNG M=64 vjp_mode=loop",
          "syncfree5": "KWNG M=5 sync_free", "syncfree_refresh10": "KWNG M=5 sync_free refresh_every=10",
          "syncfree64": "KWNG M=64 sync_free", "cached": "KWNG M=5, the cache reused (one refresh)",
          "syncfree_cached": "KWNG M=5 sync_free, the cache reused (one refresh)"}


def make_step(kind, m, options, args, device):
    """A closure that takes one timed step of the method (forward, backward/preconditioner, ``SGD.step``);
    its optional argument ``mark(name)`` is called at the end of each phase."""
    torch.manual_seed(0)
    model, x, y, loss_fn = make_problem(args.model, device, args.batch, args.width)
    if args.compile:
        model = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    options = dict(options)
    t_batch = options.pop("t_batch", None)
    t_cast = options.pop("t_autocast", None)
    kwng = KWNG(params, num_basis=m, optimizer=opt, **options) if kind in ("kwng", "split", "sub") else None
    authors = AuthorsRecipe(params, num_basis=m) if kind == "authors" else None

    def step(mark=_no_mark):
        opt.zero_grad()
        out = model(x)
        loss = loss_fn(out, y)
        mark("forward")
        if kind == "sgd":
            loss.backward()
        elif kind == "authors":
            authors.step(out, loss, lr=1e-3)
        elif kind in ("split", "sub"):
            kwng.capture(t_outputs(model, x, t_batch, t_cast) if kind == "sub" else out, loss)
            loss.backward()
            kwng.step()
        else:
            kwng.precondition(out, loss)
        mark("gradient" if kind == "sgd" else "direction")
        opt.step()
        mark("opt.step")

    step.kwng = kwng  # for benchmarks/step_timeline.py, which marks inside the preconditioner
    return step


def _no_mark(name: str) -> None:
    """``make_step``'s default phase marker: nothing."""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=default, choices=["cuda", "cpu"])
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50", "vit", "lm"])
    ap.add_argument("--steps", type=int, default=30, help="consecutive timed steps per round (mean reported)")
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps before each round's timed ones")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds over all methods, interleaved; the ratios are taken within each round")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=64, help="resnet18's first-stage channels")
    ap.add_argument("--methods", help="comma-separated subset of " + ", ".join(_methods(False)))
    ap.add_argument("--compile", action="store_true", help="torch.compile(model), default settings")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: 2 steps, batch 8, width 8, M=5 only")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.device, args.steps, args.warmup, args.batch, args.width = "cpu", 2, 1, 8, 8
        args.rounds = min(args.rounds, 2)
    methods = _methods(args.quick)
    names = args.methods.split(",") if args.methods else list(methods)
    unknown = [n for n in names if n not in methods]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(methods)}")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps = {n: make_step(*methods[n], args, device) for n in names}
    per_round = {n: [] for n in names}
    for _ in range(args.rounds):  # methods interleaved: a drift of the machine touches every method alike
        for n in names:
            per_round[n].append(mean_ms(steps[n], device, args.steps, args.warmup))
    rows = {n: statistics.median(v) for n, v in per_round.items()}

    def ratios(n, ref):
        """The ratio to ``ref`` in each round (same round, same machine state), and their median."""
        if ref not in per_round or n == ref:
            return None
        r = [a / b for a, b in zip(per_round[n], per_round[ref], strict=True)]
        return statistics.median(r), min(r), max(r)

    def show(r):
        if r is None:
            return "—"
        return f"{r[0]:.2f}" if args.rounds == 1 else f"{r[0]:.2f} ({r[1]:.2f}–{r[2]:.2f})"

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model}{' (compiled)' if args.compile else ''}, batch {args.batch}, mean over {args.steps} "
          f"consecutive steps per round, {args.rounds} round(s) with the methods interleaved (median over "
          f"rounds; ratios taken within each round: median (smallest–largest)), {dev}, "
          f"torch {torch.__version__}")
    print("| method | ms/step | × SGD | × authors' recipe (same M) |\n|---|---|---|---|")
    for n, ms in rows.items():
        anchor = {5: "authors5", 64: "authors64"}.get(methods[n][1])
        print(f"| {LABELS[n]} | {ms:.2f} | {show(ratios(n, 'sgd'))} | {show(ratios(n, anchor))} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev, "model": args.model, "compile": args.compile, "batch": args.batch,
                       "steps": args.steps, "rounds": args.rounds, "ms_per_step": rows,
                       "ms_per_round": per_round}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

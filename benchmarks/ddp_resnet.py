"""Data-parallel KWNG on the seed's ill-conditioned ResNet-18 (issue: the NCCL run).

Two parts, one process per rank (``torch.multiprocessing.spawn``), NCCL on GPUs or gloo on CPUs:

1. **Check.** One KWNG step (``num_basis`` pairs, ``D = diag(Ĝ)^{-1/2}``, no clipping, fixed ε)
   under :class:`~torch.nn.parallel.DistributedDataParallel`, each rank on its own batch. Rank 0
   then recomputes the direction as *one process on the concatenated batch*: the model's outputs
   on each rank's chunk (BatchNorm in training mode sees the same per-rank batches as under DDP),
   the mean loss, and :func:`wngkernels.kwng_direction` with a batched VJP, the same basis (rank
   0's pairs, indices into the concatenated batch) and the same bandwidth. It prints the largest
   relative difference between any rank's direction and that reference, and between ranks.
2. **Timing.** Median step time of plain DDP SGD and of DDP SGD + KWNG (M = ``num_basis``)
   at this world size; the ratio KWNG / SGD.

    python benchmarks/ddp_resnet.py --world-size 2 --device cpu --batch 8 --steps 3      # gloo, CPU
    python benchmarks/ddp_resnet.py --world-size 1 --device cuda                          # NCCL, 1 GPU

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``) as the device machines require.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from illcond import ResNet18, train_step  # noqa: E402

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int, batch: int, device, dtype):
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(batch, 3, 32, 32, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return x.to(device), y.to(device)


def _model(device, dtype):
    torch.manual_seed(0)
    return ResNet18().to(device=device, dtype=dtype).train()


def _wrap(model, device):
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _flat_grad(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


def _check(rank, world, args, device, dtype, tmp):
    from wngkernels.torch import KWNG

    model = _model(device, dtype)
    ddp = _wrap(model, device)
    kwng = KWNG(ddp.parameters(), num_basis=args.num_basis, eps=args.eps, adaptive_eps=False,
                clip_norm=None, generator=args.seed, lr=0.1)
    x, y = _batch(rank, args.batch, device, dtype)
    out = ddp(x)
    kwng.precondition(out, F.cross_entropy(out, y))
    torch.save({"w": _flat_grad(model.parameters()).cpu(), "fallbacks": kwng.num_fallbacks},
               os.path.join(tmp, f"w{rank}.pt"))
    dist.barrier()
    if rank != 0:
        return None
    import wngkernels as wk

    ref_model = _model(device, dtype)
    params = [p for p in ref_model.parameters() if p.requires_grad]
    outs, losses = [], []
    for r in range(world):  # per-rank chunks: the BatchNorm statistics DDP's ranks saw
        xr, yr = _batch(r, args.batch, device, dtype)
        o = ref_model(xr)
        outs.append(o)
        losses.append(F.cross_entropy(o, yr))
    outputs = torch.cat(outs)
    loss = torch.stack(losses).mean()  # DDP averages the ranks' gradients
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, retain_graph=True)])

    def vjp(cot):  # (M, N, d) -> (M, q), one batched backward
        rows = torch.autograd.grad(outputs, params, grad_outputs=cot, retain_graph=True,
                                   is_grads_batched=True)
        return torch.cat([t.reshape(cot.shape[0], -1) for t in rows], dim=1)

    w_ref = wk.kwng_direction(g, outputs.detach(), kernel=kwng.last_kernel, basis=kwng.last_basis,
                              eps=args.eps, damping="jacobian", vjp=vjp)
    ws = [torch.load(os.path.join(tmp, f"w{r}.pt"), weights_only=True) for r in range(world)]
    w_ref = w_ref.cpu()
    rel = max(float((w["w"] - w_ref).norm() / w_ref.norm()) for w in ws)
    between = max(float((w["w"] - ws[0]["w"]).norm() / ws[0]["w"].norm()) for w in ws)
    return rel, between, sum(w["fallbacks"] for w in ws), g.numel()


def _time(rank, args, device, dtype, use_kwng: bool) -> float:
    from wngkernels.torch import KWNG

    model = _model(device, dtype)
    ddp = _wrap(model, device)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    kwng = None
    if use_kwng:
        kwng = KWNG(ddp.parameters(), num_basis=args.num_basis, optimizer=opt, generator=args.seed)
    x, y = _batch(rank, args.batch, device, dtype)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        train_step(ddp, opt, kwng, x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _worker(rank, world, port, args, tmp):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        dtype = torch.float64 if args.float64 else torch.float32
        check = _check(rank, world, args, device, dtype, tmp)
        sgd = _time(rank, args, device, dtype, use_kwng=False)
        kw = _time(rank, args, device, dtype, use_kwng=True)
        if rank == 0:
            rel, between, fallbacks, q = check
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            print(f"ResNet-18 (logits × logspace(-6, 1, 10)), q = {q}, world size {world}, "
                  f"batch {args.batch}/rank, {dtype}, {name}, torch {torch.__version__}")
            print(f"direction vs one process on the concatenated batch: max relative difference {rel:.2e}")
            print(f"direction between ranks: max relative difference {between:.2e}; fallbacks {fallbacks}")
            print(f"| world size | DDP SGD ms/step | DDP + KWNG M={args.num_basis} ms/step | ratio |")
            print("|---|---|---|---|")
            print(f"| {world} | {sgd:.1f} | {kw:.1f} | {kw / sgd:.2f} |")
    finally:
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=None, help="default: GPUs on cuda, 2 on cpu")
    default = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", choices=["cuda", "cpu"], default=default)
    ap.add_argument("--batch", type=int, default=128, help="samples per rank")
    ap.add_argument("--num-basis", type=int, default=5)
    ap.add_argument("--eps", type=float, default=1e-5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--float64", action="store_true")
    args = ap.parse_args(argv)
    world = args.world_size or (torch.cuda.device_count() if args.device == "cuda" else 2)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, _free_port(), args, tmp), nprocs=world, join=True)


if __name__ == "__main__":
    main()

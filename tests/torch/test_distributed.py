"""Data parallel KWNG: 2 CPU processes (gloo) against one process on the union batch."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from wngkernels import AuthorsRule, Gaussian, kwng_direction  # noqa: E402
from wngkernels.torch import KWNG  # noqa: E402

from .helpers import dense_jacobian, make_model, rel_err  # noqa: E402

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, tmp_path, *args):
    """Run ``worker(rank, port, out_dir, *args)`` on every rank; each rank's saved report."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(_free_port(), str(tmp_path), *args), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _data():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(2 * 10, 4, generator=gen, dtype=torch.float64), torch.randn(2 * 10, generator=gen,
                                                                                   dtype=torch.float64)


def _mse(out, y):
    return ((out - y[:, None]) ** 2).mean()


def _start(rank, port):
    """Join the gloo group; the same float64 MLP on every rank, wrapped in DDP. A collective that
    one rank misses fails after 60 s instead of hanging the test."""
    import datetime

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    model, _ = make_model("mlp", torch.float64)
    return model, torch.nn.parallel.DistributedDataParallel(model)


def _worker(rank, port, out_dir, accumulation):
    model, ddp = _start(rank, port)
    try:
        kwng = KWNG(ddp.parameters(), num_basis=6, eps=1e-3, clip_norm=None, generator=5, lr=0.1,
                    accumulation_steps=accumulation)
        x, y = _data()
        xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        for i, (xi, yi) in enumerate(zip(xs.chunk(accumulation), ys.chunk(accumulation), strict=True)):
            last = i == accumulation - 1
            ctx = ddp.no_sync() if not last else _null()
            with ctx:
                out = ddp(xi)
                kwng.precondition(out, _mse(out, yi) / accumulation)
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.save({"w": grads, "indices": torch.as_tensor(kwng.last_basis.indices.copy()),
                    "dims": torch.as_tensor(kwng.last_basis.dims.copy()), "ell": kwng.last_kernel.bandwidth,
                    "state": kwng.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_gloo_processes_equal_one_process_on_the_union_batch(tmp_path, accumulation):
    from wngkernels import NystromBasis

    res = _spawn(_worker, tmp_path, accumulation)
    assert torch.equal(res[0]["w"], res[1]["w"])  # every rank writes the same direction
    assert res[0]["state"]["rng"] == res[1]["state"]["rng"]
    # one process, union batch; the basis is rank 0's: its first micro-batch, which opens the union batch
    model, _ = make_model("mlp", torch.float64)
    x, y = _data()
    params = list(model.parameters())
    samples, jac = dense_jacobian(model, x, params)
    # the bandwidth rule saw the first micro-batch of each rank
    first = torch.cat([r.chunk(accumulation)[0] for r in samples.chunk(WORLD)])
    basis = NystromBasis(res[0]["indices"].numpy(), res[0]["dims"].numpy())
    ell = Gaussian(AuthorsRule()).resolve(samples[basis.indices.copy()], first).bandwidth
    assert abs(ell - res[0]["ell"]) < 1e-12 * ell
    g = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(_mse(model(x), y), params)])
    w = kwng_direction(g, samples, kernel=Gaussian(ell), basis=basis, eps=1e-3, damping="jacobian",
                       jacobian=jac)
    assert rel_err(res[0]["w"].numpy(), w.numpy()) < 1e-10
    assert np.all(np.isfinite(res[0]["w"].numpy()))


def _short_worker(rank, port, out_dir):
    """Rank 1 holds a last batch of 2 samples (N·d = 6 < M = 8); rank 0 a full one."""
    model, ddp = _start(rank, port)
    try:
        kwng = KWNG(ddp.parameters(), num_basis=8, eps=1e-3, clip_norm=None, generator=5, lr=0.1)
        x, y = _data()
        xi, yi = (x[:10], y[:10]) if rank == 0 else (x[10:12], y[10:12])
        out = ddp(xi)
        kwng.precondition(out, _mse(out, yi))
        torch.save({"w": torch.cat([p.grad.reshape(-1) for p in model.parameters()]),
                    "m": kwng.last_basis.num_basis, "short": kwng.num_short_batches},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_short_batch_on_one_rank_gives_every_rank_the_same_smaller_basis(tmp_path):
    res = _spawn(_short_worker, tmp_path)
    assert res[0]["m"] == res[1]["m"] == 6  # the smallest N·d of the group, on every rank
    assert res[0]["short"] == res[1]["short"] == 1
    assert torch.equal(res[0]["w"], res[1]["w"]) and bool(torch.isfinite(res[0]["w"]).all())


def _disagree_worker(rank, port, out_dir):
    """Two situations where the ranks' own data would lead them apart: every rank must take the
    same decision (and none may wait for a collective that another skips)."""
    from wngkernels import Gaussian, MedianHeuristic

    model, ddp = _start(rank, port)
    report = {}
    try:
        x, y = _data()
        xi, yi = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        # 1. the median heuristic is evaluated on rank 0's batch, whose outputs are all equal
        kwng = KWNG(ddp.parameters(), kernel=Gaussian(MedianHeuristic()), generator=5, lr=0.1)
        out = ddp(xi)
        if rank == 0:
            out = out * 0.0 + 1.0
        kwng.precondition(out, _mse(out, yi))
        report["fallbacks"] = kwng.num_fallbacks
        report["w"] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        # 2. the ranks' outputs have different d
        kwng = KWNG(ddp.parameters(), generator=5, lr=0.1)
        out = ddp(xi)
        if rank == 1:
            out = torch.cat([out, out], dim=1)
        try:
            kwng.capture(out, _mse(out, yi))
            report["error"] = ""
        except ValueError as exc:
            report["error"] = str(exc)
        report["pending"] = kwng._pending is None
        torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_ranks_take_one_decision_where_their_data_would_split_them(tmp_path):
    res = _spawn(_disagree_worker, tmp_path)
    # a degenerate bandwidth on rank 0 is every rank's fallback to g, the same g everywhere
    assert res[0]["fallbacks"] == res[1]["fallbacks"] == 1
    assert torch.equal(res[0]["w"], res[1]["w"])
    # different d: every rank raises, naming the mismatch, and keeps no half-captured step
    for r in res:
        assert "same number of features d on every rank" in r["error"] and "3 to 6" in r["error"]
        assert r["pending"]

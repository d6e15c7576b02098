"""The training benchmark's anchor computes the authors' direction, and its smoke run works."""

from __future__ import annotations

import copy
import csv
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch.nn import functional as F  # noqa: E402

from . import authors  # noqa: E402
from .helpers import dense_jacobian  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import illcond  # noqa: E402
import illcond_train  # noqa: E402


def test_authors_recipe_matches_the_dense_float64_formula():
    torch.manual_seed(0)
    model = authors.IllConditionedNet().train()
    params = list(model.parameters())
    recipe = illcond.AuthorsRecipe(params, clip=float("inf"))
    cosines = []
    for x, y in authors.digits_batches(32, 4, seed=5):
        for p in params:
            p.grad = None
        out = model(x)
        recipe.step(out, F.cross_entropy(out, y), lr=1.0)
        w = torch.cat([p.grad.reshape(-1) for p in params]).double().numpy()
        model64 = copy.deepcopy(model).double()
        samples, jac = dense_jacobian(model64, x.double(), list(model64.parameters()))
        g = torch.autograd.grad(F.cross_entropy(model64(x.double()), y), list(model64.parameters()))
        g = torch.cat([gi.reshape(-1) for gi in g]).numpy()
        ref = authors.direction(g, samples.numpy(), jac.numpy(), *recipe.last_basis, recipe.eps)
        cosines.append(float(w @ ref / np.linalg.norm(w) / np.linalg.norm(ref)))
    assert min(cosines) > 0.999, cosines


def test_quick_run_writes_table_csv_and_figure(tmp_path, capsys):
    illcond_train.main(["--quick", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "illcond_train.csv")))
    assert {r["method"] for r in rows} == set(illcond_train.QUICK)
    assert all(int(r["nonfinite_params"]) == 0 for r in rows if r["method"] != "sgd_lr10")
    assert (tmp_path / "illcond_train.png").stat().st_size > 0
    table = (tmp_path / "illcond_train.md").read_text()
    for name in illcond_train.QUICK:
        assert f"| {name} |" in table
    assert "| method | best_test_acc |" in capsys.readouterr().out


def test_evaluation_with_batch_statistics_leaves_the_running_statistics_alone():
    torch.manual_seed(0)
    model = illcond.ResNet18(width=4).train()
    x, y = torch.randn(20, 3, 16, 16), torch.randint(0, 10, (20,))
    model(x)                                   # running statistics away from their initial values
    before = copy.deepcopy(model.state_dict())
    loss, acc, loss_eval, acc_eval = illcond_train._evaluate(model, (x, y, x[:10], y[:10]), batch=10)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training
    with torch.no_grad():                      # batch statistics of each batch of 10, computed directly
        out = torch.cat([model(x[:10]), model(x[10:])])
        model.load_state_dict(before)
        model.eval()
        out_eval = model(x)
    assert loss == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)
    assert acc == pytest.approx(float((out[:10].argmax(1) == y[:10]).double().mean()))
    assert loss_eval == pytest.approx(float(F.cross_entropy(out_eval, y)), rel=1e-5)
    assert acc_eval == pytest.approx(float((out_eval[:10].argmax(1) == y[:10]).double().mean()))


def test_solve_time_quick_run_prints_every_stage(capsys):
    import solve_time

    solve_time.main(["--quick"])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| 5 |")]
    assert len(row) == 1
    values = [float(v) for v in row[0].strip("|").split("|")[1:]]
    assert len(values) == 5 and all(v > 0 for v in values)


@pytest.mark.parametrize("name", ["kwng_bf16T", "kwng_sub32_bf16T"])
def test_t_under_autocast_methods_train(name):
    """The training benchmark's bf16-``T`` methods run (CPU autocast) and move the loss, no fallback."""
    import argparse

    args = argparse.Namespace(width=4, num_basis=5, batch=128, epochs=1)
    rows = illcond_train.train(name, 0, args, illcond.digits_32(torch.device("cpu"), 16), torch.device("cpu"))
    assert len(rows) == 2 and rows[-1]["fallbacks"] == 0 and rows[-1]["nonfinite_params"] == 0
    assert rows[-1]["train_loss"] != rows[0]["train_loss"]


def test_step_benchmark_interleaves_rounds(tmp_path, capsys):
    import json

    import torch_step

    torch_step.main(["--quick", "--rounds", "2", "--methods", "sgd,authors5,kwng5,bf16T",
                     "--out", str(tmp_path / "s.json")])
    got = json.loads((tmp_path / "s.json").read_text())
    assert got["rounds"] == 2 and all(len(v) == 2 for v in got["ms_per_round"].values())
    table = capsys.readouterr().out
    kwng = next(line for line in table.splitlines() if line.startswith("| KWNG M=5 (precondition)"))
    ratio = kwng.split("|")[4].strip()  # "r (lo–hi)": the ratio to the authors' recipe within the rounds
    r, lo, hi = (float(v) for v in ratio.replace("(", "").replace(")", "").replace("–", " ").split())
    assert 0 < lo <= r <= hi


def test_cheap_t_measures_against_a_reproducible_exact_direction():
    """The same option and basis twice gives the same direction (cosine 1: BatchNorm buffers restored,
    nothing carried between measurements); the quick run reports every option at every checkpoint."""
    import cheap_t

    torch.manual_seed(0)
    model = illcond.ResNet18(width=4).train()
    params = list(model.parameters())
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    from wngkernels import nystrom_basis

    basis = nystrom_basis((32, 10), 5, rng=0)
    before = [b.clone() for b in model.buffers()]
    got = cheap_t.measure(model, params, [(x, y)], 1e-4, 5, np.random.default_rng(0))
    for b, v in zip(model.buffers(), before, strict=True):
        assert torch.equal(b, v)
    w1 = cheap_t.direction(model, params, x, y, cheap_t.OPTIONS["exact"], basis, 1e-4, 5)
    w2 = cheap_t.direction(model, params, x, y, cheap_t.OPTIONS["exact"], basis, 1e-4, 5)
    assert float(w1 @ w2 / (w1.norm() * w2.norm())) == pytest.approx(1.0, abs=1e-6)
    assert set(got) == set(cheap_t.OPTIONS) - {"exact"}
    assert all(-1 - 1e-9 <= c <= 1 + 1e-9 for cos, _ in got.values() for c in cos)
    rows = cheap_t.main(["--quick"])
    assert {(r[0], r[2]) for r in rows} == {(e, n) for e in (0, 1) for n in cheap_t.OPTIONS if n != "exact"}


def test_lean_step_computes_kwngs_direction_and_runs():
    """The read-free bound of ``benchmarks/lean_step.py`` (Cholesky whitening, Woodbury solve) gives
    ``KWNG.precondition``'s direction on the same basis (another factorisation of the same
    formula), and its quick run times the library and lean steps side by side."""
    import lean_step

    cosines = lean_step.check_direction(torch.device("cpu"), 16, 8)
    assert len(cosines) == 3 and all(c > 0.9999 for c in cosines)
    rows = lean_step.main(["--quick", "--rounds", "1", "--methods", "sgd,authors5,lean,lean10,lean_reads10"])
    assert set(rows) == {"sgd", "authors5", "lean", "lean10", "lean_reads10"}
    assert all(ms > 0 for ms in rows.values())
    for bad in ("lean_graph", "no_such_method"):  # graphs need CUDA; unknown names are refused
        with pytest.raises(SystemExit):
            lean_step.main(["--quick", "--methods", bad])


def test_step_reads_stand_ins_are_scoped_and_leave_the_parameters_alone():
    """``benchmarks/step_reads.py`` replaces the step's synchronising operations only inside its
    block (restored after it, also on an error: the core computes true values again), its stubbed
    steps never move the parameters (their numbers are wrong by construction), and its quick run
    times every method side by side."""
    import argparse

    import step_reads

    from wngkernels import _backend

    linalg = step_reads._linalg()
    before = (linalg.eigh, _backend.max_abs)
    a = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="inside"):
        with step_reads.stand_ins(None):
            assert torch.equal(linalg.eigh(a)[1], torch.eye(2, dtype=torch.float64))  # not a decomposition
            raise RuntimeError("inside")
    assert (linalg.eigh, _backend.max_abs) == before
    values = linalg.eigh(a)[0]  # the real one again: the closed form 1, 3
    assert torch.allclose(values, torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert _backend.max_abs(np, np.array([-3.0, 2.0])) == 3.0

    spec = argparse.Namespace(batch=16, width=8)
    for name in ("stub_read_end", "stub_read_g", "stub_no_read"):
        step = step_reads._make(name, spec, torch.device("cpu"))
        start = [p.detach().clone() for p in step.kwng._params]
        step()
        step()
        assert all(torch.equal(p, q) for p, q in zip(step.kwng._params, start, strict=True))
    rows = step_reads.main(["--quick", "--rounds", "1"])
    assert set(rows) == set(step_reads.METHODS) and all(ms > 0 for ms in rows.values())
    for bad in (["--methods", "no_such_method"], ["--syncs"]):  # --syncs needs CUDA
        with pytest.raises(SystemExit):
            step_reads.main(["--quick", *bad])


def test_step_timeline_marks_every_phase_in_order():
    """``benchmarks/step_timeline.py`` marks the forward, the preconditioner's ``step()`` (entered after
    the capture) and the optimizer, in the order they run; the marking leaves the step's direction
    as it is (the same ``.grad`` as an unmarked step from the same state)."""
    import step_timeline
    import torch_step

    out = step_timeline.main(["--quick", "--methods", "sgd,kwng5"])
    assert [n for n, _, _ in out["sgd"]] == ["forward", "gradient", "opt.step"]
    assert [n for n, _, _ in out["kwng5"]] == ["forward", "before step()", "direction", "opt.step"]
    for rows in out.values():
        host = [h for _, h, _ in rows]
        assert host == sorted(host) and host[0] > 0
    args = SimpleNamespace(model="resnet18", batch=8, width=4, compile=False)
    grads = []
    for mark in (False, True):
        step = torch_step.make_step("kwng", 5, {"generator": 0}, args, torch.device("cpu"))
        run = step_timeline.marked(step, step_timeline.Marks(False)) if mark else step
        run()
        grads.append(torch.cat([p.grad.reshape(-1) for p in step.kwng._params]))
    assert torch.equal(grads[0], grads[1])
    for bad in (["--quick", "--methods", "no_such_method"], ["--quick", "--syncs"]):
        with pytest.raises(SystemExit):
            step_timeline.main(bad)


def test_sync_free_accuracy_smoke_run():
    """``benchmarks/sync_free_accuracy.py --quick``: both float32 directions are close to the float64 one."""
    import sync_free_accuracy

    errors = sync_free_accuracy.main(["--quick"])
    assert all(len(e) == 2 and max(e) < 0.5 for e in errors.values())

"""The training benchmark's anchor computes the authors' direction, and its smoke run works."""

from __future__ import annotations

import copy
import csv
import sys
from pathlib import Path

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

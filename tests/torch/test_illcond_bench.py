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

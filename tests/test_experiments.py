"""The experiments package: each experiment's quick path on a tiny size, and the command line.

The numbers are checked against independent truths (closed-form natural gradients, the
closed-form W₂ loss), not against recorded outputs.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from wngkernels.experiments import EXPERIMENTS, _io
from wngkernels.experiments import run as run_experiment
from wngkernels.experiments.__main__ import main


def _median(rows, value, **match):
    vals = [r[value] for r in rows if all(r[k] == v for k, v in match.items())]
    assert vals, f"no rows match {match}"
    return float(np.median(vals))


def _csv_columns(path):
    return list(_io.read_csv(path)[0].keys())


def test_import_is_light():
    code = ("import sys, wngkernels.experiments; "
            "bad = [m for m in ('matplotlib', 'tqdm', 'torch', 'sklearn') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_consistency_error_falls_with_n(tmp_path):
    res = run_experiment("consistency", size="tiny", out=tmp_path, show_progress=False, verbose=False)
    columns = set(_csv_columns(tmp_path / "consistency.csv"))
    assert {"model", "d", "N", "M", "eps", "lam", "seed", "rel_error"} <= columns
    assert (tmp_path / "consistency_vs_N.png").stat().st_size > 0
    assert (tmp_path / "consistency_vs_M.png").stat().st_size > 0
    assert len(_io.read_csv(tmp_path / "consistency.csv")) == len(res.rows)
    for model in ("gaussian", "hypersphere"):
        small = _median(res.rows, "rel_error", sweep="N", model=model, N=100)
        large = _median(res.rows, "rel_error", sweep="N", model=model, N=1000)
        assert large < small, (model, small, large)
        assert large < 0.1, (model, large)
    # the M-sweep's basis sizes are what the CSV says they are
    assert sorted({r["M"] for r in res.rows if r["sweep"] == "M"}) == [3, 8, 34]


def test_consistency_torch_backend_matches_numpy(tmp_path):
    pytest.importorskip("torch")
    from wngkernels.experiments import consistency

    model = consistency.MODELS["gaussian"](3)
    errs = {}
    for backend in ("numpy", "torch"):
        rng = np.random.default_rng(5)
        errs[backend] = consistency.relative_error(model, 300, 30, rng, _io.Arrays(backend),
                                                   kernel=consistency.Gaussian(consistency.AuthorsRule()),
                                                   eps=1e-6, lam=0.0)
    assert errs["torch"] == pytest.approx(errs["numpy"], rel=1e-6)


def test_bandwidth_too_narrow_kernel_is_worse(tmp_path):
    res = run_experiment("bandwidth", size="tiny", out=tmp_path, show_progress=False, verbose=False)
    assert {"kernel", "log_bandwidth", "N", "M", "rel_error"} <= set(_csv_columns(tmp_path / "bandwidth.csv"))
    assert {r["kernel"] for r in res.rows} == {"gaussian", "rational_quadratic"}
    for kernel in ("gaussian", "rational_quadratic"):
        narrow = _median(res.rows, "rel_error", kernel=kernel, log_bandwidth=-2.0)
        rule = _median(res.rows, "rel_error", kernel=kernel, log_bandwidth=0.0)
        assert rule < narrow, (kernel, rule, narrow)
        assert rule < 0.1


def test_trajectory_natural_gradients_beat_gd(tmp_path):
    from wngkernels.experiments import trajectory
    from wngkernels.models import w2_diagonal_gaussians

    res = run_experiment("trajectory", size="tiny", out=tmp_path, show_progress=False, verbose=False)
    assert {"method", "seed", "iter", "loss", "theta_fast", "theta_slow"} <= set(
        _csv_columns(tmp_path / "trajectory.csv"))
    cfg = trajectory.PRESETS["tiny"]
    final = {m: _median(res.rows, "loss", method=m, iter=cfg.steps) for m in trajectory.METHODS}
    # the recorded start is the closed-form W2 of θ₀ = (0, 1) to the target
    start, target, _ = trajectory._problem(cfg)
    initial = _median(res.rows, "loss", method="gd", iter=0)
    assert initial == pytest.approx(float(w2_diagonal_gaussians(start, target)))
    # exact NG contracts θ − θ* by (1 − 2 lr) per step, whatever the scaling
    assert final["ng_exact"] == pytest.approx(initial * (1 - 2 * cfg.lr) ** (2 * cfg.steps), rel=1e-6)
    for m in ("ng_exact", "kwng", "kwng_diag", "kwng_theta"):
        assert final[m] < 0.1 * final["gd"], (m, final)
    # invariance: KWNG in ψ and in θ follow the same path (same samples, same basis)
    a = [r["theta_slow"] for r in res.rows if r["method"] == "kwng"]
    b = [r["theta_slow"] for r in res.rows if r["method"] == "kwng_theta"]
    np.testing.assert_allclose(a, b, rtol=1e-3)


def test_trajectory_rejects_unknown_method(tmp_path):
    with pytest.raises(ValueError, match="methods must be"):
        run_experiment("trajectory", size="tiny", out=tmp_path, methods=("newton",))


@pytest.mark.parametrize("seed", [0, 10, 20])
def test_classification_kwng_beats_sgd_when_ill_conditioned(tmp_path, seed):
    """KWNG at the authors' untuned settings (plain SGD, lr 10, clipped to norm 1) against SGD with
    momentum at its best rate of a sweep, by the best test accuracy; three independent seeds.
    (Training at lr 10 is chaotic — a 1e-7 change of the initialisation moves the loss after 300
    steps by 30 % — so the training loss at one step is no measure.)"""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    res = run_experiment("classification", size="tiny", out=tmp_path, show_progress=False, verbose=False,
                         optimizers=("sgd", "kwng_diag"), seed=seed)
    cols = set(_csv_columns(tmp_path / "classification.csv"))
    assert {"optimizer", "seed", "step", "wall_s", "train_loss", "test_acc", "conditioning"} <= cols
    assert (tmp_path / "classification.png").stat().st_size > 0
    first = _median(res.rows, "train_loss", optimizer="kwng_diag", step=0)
    lowest = min(r["train_loss"] for r in res.rows if r["optimizer"] == "kwng_diag")
    assert lowest < first

    def best_acc(name):
        return max(r["test_acc"] for r in res.rows if r["optimizer"] == name)

    assert best_acc("kwng_diag") > best_acc("sgd")  # the paper's measure
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in res.rows)


def test_classification_refuses_cupy(tmp_path):
    with pytest.raises(ValueError, match="backend for classification"):
        run_experiment("classification", size="tiny", backend="cupy", out=tmp_path)


def test_unknown_experiment_and_size(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment("mnist", out=tmp_path)
    with pytest.raises(ValueError, match="size must be one of"):
        run_experiment("consistency", size="huge", out=tmp_path)
    with pytest.raises(ValueError, match="out must be"):
        run_experiment("consistency", size="tiny", out=None)


def test_arrays_rejects_bad_backend_and_device():
    with pytest.raises(ValueError, match="backend must be one of"):
        _io.Arrays("jax")
    with pytest.raises(ValueError, match="needs --backend torch or cupy"):
        _io.Arrays("numpy", "cuda")
    with pytest.raises(TypeError, match="device must be a string"):
        _io.Arrays("numpy", 0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["mnist", "--out", "x"], "invalid choice: 'mnist'"),
        (["consistency"], "the following arguments are required: --out"),
        (["consistency", "--backend", "jax", "--out", "x"], "invalid choice: 'jax'"),
        (["trajectory", "--well-conditioned", "--out", "x"], "unrecognized arguments: --well-conditioned"),
        (["consistency", "--device", "cuda", "--out", "x"], "needs --backend torch or cupy"),
        (["consistency", "--seed", "-1", "--out", "x"], "--seed: must be an integer >= 0; got -1"),
        (["consistency", "--seed", "one", "--out", "x"], "--seed: must be an integer >= 0; got 'one'"),
        (["consistency", "--out", ""], "--out: must name a directory; got an empty path"),
        (["consistency", "--out", "{file}"], "is an existing file, not a directory"),
        (["consistency", "--out", "{file}/sub"], "which is a file"),
    ],
)
def test_cli_bad_input_exits_with_one_line_and_creates_nothing(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created


def test_cli_classification_without_torch_says_which_extra(capsys, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        main(["classification", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert 'classification needs torch: pip install -c constraints.txt -e ".[torch]"' in err
    assert not (tmp_path / "out").exists()


def test_each_experiment_has_its_own_help(capsys):
    texts = {}
    for name in EXPERIMENTS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        texts[name] = capsys.readouterr().out
        assert "Needs:" in texts[name] and "Takes:" in texts[name] and "Writes into --out:" in texts[name]
    assert len(set(texts.values())) == len(EXPERIMENTS)
    assert "--well-conditioned" in texts["classification"]
    assert all("--well-conditioned" not in t for n, t in texts.items() if n != "classification")
    assert "PyTorch" in texts["classification"]


def test_cli_runs_and_writes_outputs(tmp_path, capsys):
    assert main(["trajectory", "--size", "tiny", "--no-progress", "--seed", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ng_exact" in out and "done in" in out
    rows = _io.read_csv(tmp_path / "trajectory.csv")
    assert {r["seed"] for r in rows if r["method"] == "kwng"} == {3}
    assert (tmp_path / "trajectory.png").exists()


def test_every_experiment_has_a_module():
    import importlib

    for name in EXPERIMENTS:
        assert callable(importlib.import_module(f"wngkernels.experiments.{name}").run)


def test_summary_helpers_against_numpy():
    rng = np.random.default_rng(0)
    vals = list(rng.standard_normal(11))
    q1, q2, q3 = _io.quantiles(vals)
    np.testing.assert_allclose([q1, q2, q3], np.percentile(vals, [25, 50, 75]))
    xs = [10.0, 100.0, 1000.0]
    assert _io.loglog_slope(xs, [x ** -0.37 for x in xs]) == pytest.approx(-0.37)

"""Shared plumbing of the experiments: array backends, tidy CSV, summaries, progress, figures.

Nothing here imports matplotlib, tqdm or an optional array library at module level, so
``import wngkernels.experiments`` stays as light as the core.
"""

from __future__ import annotations

import csv
import importlib
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BACKENDS = ("numpy", "torch", "cupy")


class Arrays:
    """The one place where an experiment meets an array library.

    Inputs are built with NumPy on the host (seeded), converted *once* with :meth:`asarray`,
    and everything after that is array-API code on ``xp``; results come back as Python
    floats through :meth:`norm`.

    Parameters
    ----------
    backend : {"numpy", "torch", "cupy"}
        The array library the estimator runs on.
    device : str, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``…; ``None`` for the library's default.
    """

    def __init__(self, backend: str = "numpy", device: str | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if device is not None and not isinstance(device, str):
            raise TypeError(f"device must be a string such as 'cpu' or 'cuda'; got {device!r}")
        if backend == "numpy" and device not in (None, "cpu"):
            raise ValueError(f"device {device!r} needs --backend torch or cupy; numpy runs on the CPU")
        try:
            self.xp = importlib.import_module(f"array_api_compat.{backend}")
        except ImportError as exc:
            raise ValueError(f"backend {backend!r} is not available here: {exc}") from None
        self.backend = backend
        self.device = self._device(backend, device)
        self.like = self.xp.asarray(0.0, dtype=self.xp.float64, device=self.device)

    @staticmethod
    def _device(backend: str, device: str | None):
        if device is None or backend == "numpy":
            return None
        if backend == "cupy":  # CuPy's device is a Device object, not a string
            import cupy

            index = device.rpartition(":")[2] if ":" in device else "0"
            if not (device == "cuda" or device.startswith("cuda:")) or not index.isdigit():
                raise ValueError(f"device for cupy must be 'cuda' or 'cuda:N'; got {device!r}")
            return cupy.cuda.Device(int(index))
        import torch

        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device {device!r} is not a torch device: {exc}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
        return dev

    def asarray(self, a):
        """A NumPy array (or number) as a float64 array of this backend, on its device."""
        return self.xp.asarray(a, dtype=self.xp.float64, device=self.device)

    def rel_error(self, estimate, exact) -> float:
        """``‖estimate − exact‖ / ‖exact‖`` as a Python float."""
        xp = self.xp
        return float(xp.linalg.vector_norm(estimate - exact) / xp.linalg.vector_norm(exact))

    def __repr__(self) -> str:
        return f"Arrays({self.backend!r}, device={self.device!r})"


# -- results on disk -------------------------------------------------------------------------


def out_dir(out) -> Path:
    """Create (if needed) and return the output directory."""
    if out is None:
        raise ValueError("out must be a directory path; got None")
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` (one dict per run) as a tidy CSV; columns in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in columns})
    return path


def _fmt(v):
    if isinstance(v, float):
        return repr(v)
    return v


def read_csv(path) -> list[dict]:
    """Read a CSV written by :func:`write_csv`; numeric-looking fields become numbers."""
    with open(path, newline="") as fh:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _parse(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


# -- summaries --------------------------------------------------------------------------------


def quantiles(values: Iterable[float]) -> tuple[float, float, float]:
    """(25 %, median, 75 %) of finite ``values``; NaNs when there are none."""
    vals = sorted(v for v in values if math.isfinite(v))
    if not vals:
        return math.nan, math.nan, math.nan
    if len(vals) == 1:
        return vals[0], vals[0], vals[0]
    q1, q2, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return q1, q2, q3


def group(rows: Iterable[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    """Rows grouped by the values of ``keys``, in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return out


def summarise(rows, keys: Sequence[str], value: str) -> list[dict]:
    """Per group of ``keys``: ``n``, and the quartiles of ``value`` (``q25, median, q75``)."""
    out = []
    for key, members in group(rows, keys).items():
        q1, q2, q3 = quantiles(float(r[value]) for r in members)
        out.append({**dict(zip(keys, key, strict=True)), "n": len(members), "q25": q1, "median": q2,
                    "q75": q3})
    return out


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, title: str = "") -> str:
    """A plain-text table (also valid Markdown) of ``rows``."""
    if not rows:
        return f"{title}\n(no rows)" if title else "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(([title] if title else []) + [line, rule, *body])


def _cell(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}" if (abs(v) >= 1e-3 or v == 0) and abs(v) < 1e5 else f"{v:.2e}"
    return str(v)


# -- progress and figures ---------------------------------------------------------------------


def progress(iterable, *, total: int | None = None, desc: str = "", enabled: bool = True):
    """``tqdm`` over ``iterable`` when enabled and installed; the bare iterable otherwise."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def pyplot():
    """matplotlib's ``pyplot`` on the non-interactive Agg backend."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the experiments draw their plots with matplotlib: "
                          "pip install 'wngkernels[experiments]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 90) -> Path:
    """Save ``fig`` as a compact PNG and close it."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


def band(ax, x, rows_by_x: dict[Any, list[float]], label: str, **style):
    """Median line and interquartile band of ``rows_by_x[x]`` on ``ax``."""
    xs = list(x)
    qs = [quantiles(rows_by_x[v]) for v in xs]
    style = {"marker": "o", "ms": 3, **style}
    (line,) = ax.plot(xs, [q[1] for q in qs], label=label, **style)
    ax.fill_between(xs, [q[0] for q in qs], [q[2] for q in qs], color=line.get_color(), alpha=0.2, lw=0)
    return line


class Result:
    """What an experiment hands back: its tidy ``rows``, a ``summary`` table and the ``files``.

    Attributes
    ----------
    name : str
    rows : list of dict
        One dict per run (the CSV's rows).
    summary : list of dict
        The printed summary table.
    files : list of pathlib.Path
        CSV and PNG files written.
    """

    def __init__(self, name: str, rows: list[dict], summary: list[dict], files: list[Path], text: str):
        self.name, self.rows, self.summary, self.files, self.text = name, rows, summary, files, text

    def __repr__(self) -> str:
        return f"Result({self.name!r}, rows={len(self.rows)}, files={[p.name for p in self.files]})"


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (finite, positive pairs only)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0
           and math.isfinite(y)]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else math.nan


def check_size(size: str, presets: dict) -> Any:
    """The preset called ``size``; ``ValueError`` naming the choices otherwise."""
    if size not in presets:
        raise ValueError(f"size must be one of {', '.join(presets)}; got {size!r}")
    return presets[size]

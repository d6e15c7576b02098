"""Every ``python`` block of ``docs/pytorch.md`` runs on its own; the data-parallel one as a script
that starts two gloo processes and trains."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest

pytest.importorskip("torch")

PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "pytorch.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def test_the_page_has_its_examples():
    assert len(BLOCKS) >= 6
    assert sum("mp.spawn" in b for b in BLOCKS) == 1


@pytest.mark.parametrize("index", [i for i, b in enumerate(BLOCKS) if "mp.spawn" not in b])
def test_each_block_runs_alone(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block may write a checkpoint
    exec(compile(BLOCKS[index], f"{PAGE.name}[block {index}]", "exec"), {"__name__": "pytorch_md"})  # noqa: S102


@pytest.mark.slow
def test_the_data_parallel_example_trains(tmp_path):
    script = tmp_path / "ddp_example.py"
    script.write_text(next(b for b in BLOCKS if "mp.spawn" in b))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(pathlib.Path(__file__).resolve().parents[2])
    path = root + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "MASTER_PORT": str(port), "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"training loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0], proc.stdout

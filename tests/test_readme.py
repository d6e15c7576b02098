"""The README stays true: its NumPy example runs and says what the README says it does."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_numpy_example_runs_and_matches_the_closed_form(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "kwng_direction" in b)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    err = np.linalg.norm(namespace["w"] - namespace["exact"]) / np.linalg.norm(namespace["exact"])
    assert err < 0.01
    assert float(capsys.readouterr().out) == err


def test_every_readme_python_block_runs_on_its_own():
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S):
        if "torch" in block:
            import pytest

            pytest.importorskip("torch")
        exec(compile(block, str(README), "exec"), {})


def test_readme_commands_are_marked_for_ci():
    text = README.read_text()
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        after = text.split(marker, 1)[1]
        assert after.lstrip().startswith("```bash"), marker

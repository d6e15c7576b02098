"""The ``python`` blocks of ``docs/pytorch.md`` run, in order, in one namespace."""

from __future__ import annotations

import pathlib
import re

import pytest

pytest.importorskip("torch")

PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "pytorch.md"


def test_pytorch_page_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name}[block {i}]", "exec"), namespace)  # noqa: S102
    assert namespace["written"] is True

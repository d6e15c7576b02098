"""The documentation: the examples of the pages in ``docs/`` run, and the site builds with ``-W``.

Each ``.rst`` page is run with :func:`doctest.testfile`. A page that needs an optional module
says so on a line ``.. doctest-requires: module other.module`` and is skipped, with the reason,
where one of them does not import. The Sphinx build is skipped where Sphinx, numpydoc or
myst-parser is missing, unless ``WNGKERNELS_REQUIRE_DOCS=1`` (set by CI), where it fails.
"""

from __future__ import annotations

import doctest
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
_SKIP_DIRS = {"_build", "_templates", "generated"}
_REQUIRES = re.compile(r"^\.\. doctest-requires:(.*)$", re.MULTILINE)
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _pages() -> list[Path]:
    pages = [p for p in DOCS.rglob("*.rst") if not _SKIP_DIRS & set(p.relative_to(DOCS).parts)]
    return sorted(p for p in pages if ">>>" in p.read_text(encoding="utf-8"))


def _missing(text: str) -> list[str]:
    missing = []
    for line in _REQUIRES.findall(text):
        for name in line.split():
            try:
                importlib.import_module(name)
            except Exception as exc:  # a missing package, or a module that is not complete yet
                missing.append(f"{name} ({type(exc).__name__}: {exc})")
    return missing


def _require_docs_tools() -> None:
    for name in ("sphinx", "numpydoc", "myst_parser"):
        try:
            importlib.import_module(name)
        except ImportError:
            reason = f"{name} is not installed (pip install -e '.[docs]')"
            if os.environ.get("WNGKERNELS_REQUIRE_DOCS") == "1":
                pytest.fail(reason + " and WNGKERNELS_REQUIRE_DOCS=1")
            pytest.skip(reason)


def test_pages_have_examples():
    names = {p.relative_to(DOCS).as_posix() for p in _pages()}
    assert {"getting_started.rst", "user_guide.rst"} <= names, names


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_examples(page: Path, capsys):
    missing = _missing(page.read_text(encoding="utf-8"))
    if missing:
        pytest.skip("needs " + ", ".join(missing))
    result = doctest.testfile(
        str(page), module_relative=False, globs={}, optionflags=_FLAGS, encoding="utf-8", report=True
    )
    report = capsys.readouterr().out
    assert result.attempted > 0, f"{page.name}: no examples found"
    assert result.failed == 0, f"{page.name}: {result.failed} of {result.attempted} examples failed\n{report}"


def test_every_public_name_is_in_the_api_reference():
    import wngkernels
    import wngkernels.models

    text = (DOCS / "api" / "index.rst").read_text(encoding="utf-8")
    listed = set(re.findall(r"^   (\w+)$", text, re.MULTILINE))
    public = set(wngkernels.__all__) | set(wngkernels.models.__all__)
    assert not public - listed, f"public names missing from docs/api/index.rst: {sorted(public - listed)}"


def test_every_torch_name_is_in_the_api_reference():
    torch_edge = pytest.importorskip(
        "wngkernels.torch", reason="needs PyTorch (wngkernels[torch])", exc_type=ImportError
    )
    text = (DOCS / "api" / "torch.rst").read_text(encoding="utf-8")
    listed = set(re.findall(r"^      (\w+)$", text, re.MULTILINE))
    missing = set(torch_edge.__all__) - listed
    assert not missing, f"public names missing from docs/api/torch.rst: {sorted(missing)}"


def test_every_dask_name_is_in_the_api_reference():
    dask_edge = pytest.importorskip("wngkernels.dask", reason="needs Dask (wngkernels[dask])",
                                    exc_type=ImportError)
    text = (DOCS / "api" / "dask.rst").read_text(encoding="utf-8")
    listed = set(re.findall(r"^      (\w+)$", text, re.MULTILINE))
    missing = set(dask_edge.__all__) - listed
    assert not missing, f"public names missing from docs/api/dask.rst: {sorted(missing)}"


def test_sphinx_build_has_no_warnings(tmp_path):
    _require_docs_tools()
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    cmd += ["-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=DOCS.parent)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert (tmp_path / "html" / "index.html").is_file()


def test_user_facing_text_cites_only_what_users_have():
    """Docstrings, pages and the README cite the documentation, not the project's internal notes."""
    root = DOCS.parent
    files = [root / "README.md", *sorted((root / "wngkernels").rglob("*.py"))]
    files += [p for p in sorted(DOCS.rglob("*")) if p.suffix in (".md", ".rst")
              and not _SKIP_DIRS & set(p.relative_to(DOCS).parts)]
    cited = [f"{p.relative_to(root)}:{i}" for p in files
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\b(DESIGN|STYLE)\b", line)]
    assert not cited, cited


def test_wngkernels_torch_without_torch_names_the_extra():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import wngkernels.torch\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=DOCS.parent).stdout
    assert 'pip install -c constraints.txt -e ".[torch]"' in out

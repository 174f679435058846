"""The package as published: ``py.typed`` shipped, one version source, and CI's type check and wheel
check kept (``.ci/run``); the slow test builds the wheel and reads its file list."""

from __future__ import annotations

import ast
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

import lightning_swag

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_py_typed_is_shipped_as_package_data() -> None:
    marker = ROOT / "lightning_swag" / "py.typed"
    assert marker.is_file() and marker.read_text() == ""
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["lightning_swag"]


def test_the_version_has_one_source() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lightning_swag.__version__"}
    # a plain string literal, so that setuptools reads it without importing the package (and torch)
    tree = ast.parse((ROOT / "lightning_swag" / "__init__.py").read_text())
    literals = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    assert literals == [lightning_swag.__version__]
    assert lightning_swag.__version__ == importlib.metadata.version("lightning-swag")


def test_ci_runs_the_type_checker_and_the_wheel_check() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ".venv/bin/mypy" in lines
    assert "bash .ci/check_wheel" in lines
    assert lines.index("bash .ci/check_wheel") < lines.index(".venv/bin/python -m pytest -q")
    mypy = PYPROJECT["tool"]["mypy"]
    assert mypy["files"] == ["lightning_swag"] and mypy["exclude"] == ["^lightning_swag/experiments/"]
    check = (ROOT / ".ci" / "check_wheel").read_text()
    assert "-m build" in check and "lightning_swag/py.typed" in check
    assert '-m venv "$work/env"' in check and 'cd "$work"' in check and ".ci/wheel_smoke.py" in check
    smoke = (ROOT / ".ci" / "wheel_smoke.py").read_text()
    assert "BMA(" in smoke and "num_samples=5" in smoke and "is_relative_to(checkout)" in smoke


@pytest.mark.slow
def test_the_wheel_holds_the_package_only(tmp_path: Path) -> None:
    """Built offline (no isolation) from a copy of the sources, so the checkout is not written to."""
    source = tmp_path / "source"
    shutil.copytree(
        ROOT / "lightning_swag", source / "lightning_swag", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), "."],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("lightning_swag-*.whl")
    assert wheel.name.startswith(f"lightning_swag-{lightning_swag.__version__}-py3-none-any")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_swag/py.typed" in names
    assert "lightning_swag/experiments/__init__.py" in names  # the kit ships (the README's first command)
    tops = {name.split("/")[0] for name in names}
    assert tops == {"lightning_swag", f"lightning_swag-{lightning_swag.__version__}.dist-info"}, tops

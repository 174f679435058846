"""The example notebooks: stored executed (outputs from their current source), and they run in fast mode.

``examples/execute_notebooks.py`` executes a notebook top to bottom and records, per code cell, the
sha256 of the source it ran. The stored notebooks must therefore show consecutive execution counts
1..n, a recorded hash equal to the hash of each code cell's current source (so no cell was edited,
added or moved without re-executing), no error or stderr output, and at least one inline figure.

The fast-mode test runs that same script with ``--fast --output-dir`` on a temporary folder (never
into ``examples/``) and applies the same checks to what it wrote. The MNIST notebook reads
``LIGHTNING_SWAG_DATA``; without the real data it gets small synthetic IDX files.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import ipykernel  # noqa: F401 - the dev extra installs it; a missing kernel must fail, not skip
import nbclient  # noqa: F401 - likewise, for the execution script
import nbformat
import pytest
from synthetic_idx import write_synthetic_idx

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPT = EXAMPLES / "execute_notebooks.py"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
RERUN = "re-execute it with `python examples/execute_notebooks.py {}`"


def check_executed_from_source(path: Path) -> nbformat.NotebookNode:
    """Assert that ``path`` holds the outputs its current source produces; return the notebook."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    rerun = RERUN.format(path.stem)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: cells not run once each, in order; {rerun}"
    for index, cell in enumerate(code, start=1):
        recorded = cell.metadata.get("lightning_swag", {}).get("source_sha256")
        current = hashlib.sha256(cell.source.encode("utf-8")).hexdigest()
        assert recorded == current, f"{path.name}: code cell {index} changed since it was executed; {rerun}"
        for output in cell.outputs:
            assert output.get("execution_count", index) == index, f"{path.name}: stale output in cell {index}"
    outputs = [output for cell in code for output in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, f"{path.name}: a cell raised {errors[0].get('ename')}; fix it and {rerun}"
    stderr = [out.text for out in outputs if out.output_type == "stream" and out.name == "stderr"]
    assert not stderr, f"{path.name}: warnings in the outputs: {stderr}"
    assert any("image/png" in out.get("data", {}) for out in outputs), f"{path.name}: no inline figure"
    stamp = nb.metadata.get("lightning_swag", {})
    assert stamp.get("machine") and stamp.get("executed"), f"{path.name}: no machine/date stamp; {rerun}"
    return nb


def test_notebooks_exist() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"sine.ipynb", "mnist.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_notebook_is_the_one_its_source_produces(path: Path) -> None:
    stamp = check_executed_from_source(path).metadata["lightning_swag"]
    assert stamp["fast"] is False, f"{path.name} was stored from a fast run; {RERUN.format(path.stem)}"
    assert stamp["synthetic_data"] is False, f"{path.name} was stored from synthetic data"


def test_the_check_catches_an_edited_cell(tmp_path: Path) -> None:
    nb = nbformat.read(EXAMPLES / "sine.ipynb", as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    code[-1].source += "\n"
    nbformat.write(nb, tmp_path / "sine.ipynb")
    with pytest.raises(AssertionError, match="changed since it was executed"):
        check_executed_from_source(tmp_path / "sine.ipynb")


def test_the_check_catches_a_reordered_cell(tmp_path: Path) -> None:
    nb = nbformat.read(EXAMPLES / "sine.ipynb", as_version=4)
    positions = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    first, last = positions[-2], positions[-1]
    nb.cells[first], nb.cells[last] = nb.cells[last], nb.cells[first]
    nbformat.write(nb, tmp_path / "sine.ipynb")
    with pytest.raises(AssertionError, match="in order"):
        check_executed_from_source(tmp_path / "sine.ipynb")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_fast_mode(path: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONHASHSEED="0")
    data_dir = env.get("LIGHTNING_SWAG_DATA")
    if not (data_dir and (Path(data_dir) / "MNIST" / "raw").is_dir()):
        data_dir = str(tmp_path / "synthetic_data")
        write_synthetic_idx(data_dir, "MNIST", num_train=2000, num_test=500, seed=0)
        write_synthetic_idx(data_dir, "FashionMNIST", num_train=10, num_test=500, seed=1)
        env["LIGHTNING_SWAG_SYNTHETIC_DATA"] = "1"
    before = path.read_bytes()
    out_dir = tmp_path / "executed"
    command = [sys.executable, str(SCRIPT), "--fast", "--data-dir", data_dir, "--output-dir", str(out_dir)]
    result = subprocess.run(
        [*command, path.stem], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{path.name} failed in fast mode:\n{result.stdout}\n{result.stderr}"
    assert path.read_bytes() == before, "the fast run must not write into examples/"
    nb = check_executed_from_source(out_dir / path.name)
    assert nb.metadata["lightning_swag"]["fast"] is True
    stored = nbformat.read(path, as_version=4)
    assert [c.source for c in nb.cells] == [c.source for c in stored.cells]  # the same notebook, run anew
    print(result.stdout.strip())
